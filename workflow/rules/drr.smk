# Per-structure DRRs at the radiograph's geometry (bonedrr.drr). Until registration exists, only
# cohorts with a known pose (the demo's true pose) get them.


rule drr:
    input:
        unpack(drr_geometry_inputs),
        density="results/{cohort}/{case}/density.nii.gz",
        labels="results/{cohort}/{case}/labels.nii.gz",
        xray="results/{cohort}/{case}/xray.nii.gz",
    output:
        drr="results/{cohort}/{case}/drr.h5",
        png=report("results/{cohort}/{case}/drr.png", category="drr"),
    log:
        "results/{cohort}/logs/drr/{case}.log",
    params:
        cli=BONEDRR,
        geometry=drr_geometry_path,
        args=drr_args,
    conda:
        "../../envs/drr.yaml"
    shell:
        "{params.cli} drr --density {input.density} --labels {input.labels} --geometry {params.geometry} "
        "--xray {input.xray} --out {output.drr} --png {output.png} {params.args} 2> {log}"
