# Per-structure DRRs at the radiograph's registered geometry (bonedrr.drr).


rule drr:
    input:
        pose="results/{cohort}/{case}/pose.json",
        density="results/{cohort}/{case}/density.nii.gz",
        labels="results/{cohort}/{case}/labels.nii.gz",
        xray="results/{cohort}/{case}/xray.nii.gz",
    output:
        drr="results/{cohort}/{case}/drr.h5",
        png=report("results/{cohort}/{case}/drr.png", category="drr"),
    log:
        "results/{cohort}/logs/drr/{case}.log",
    benchmark:
        "results/{cohort}/benchmarks/drr/{case}.tsv",
    threads: 2
    resources:
        mem_mb=mem_mb(2000, 16),
        runtime=15,
        gpu=gpus(),
    params:
        cli=BONEDRR,
        args=drr_args,
        # what a drr.h5 holds: a change reruns the rule on results made before it (a params trigger)
        content="density channels + proximal-femur thickness (cm)",
    conda:
        "../../envs/drr.yaml"
    shell:
        "{params.cli} drr --density {input.density} --labels {input.labels} --geometry {input.pose} "
        "--xray {input.xray} --out {output.drr} --png {output.png} {params.args} 2> {log}"
