# Density calibration (bonedrr.calibrate); labels come from segment (workflow/rules/segment.smk).


rule calibrate:
    input:
        ct="results/{cohort}/{case}/ct.nii.gz",
        labels="results/{cohort}/{case}/labels.nii.gz",
        case="results/{cohort}/{case}/case.json",
    output:
        density="results/{cohort}/{case}/density.nii.gz",
        calibration="results/{cohort}/{case}/calibration.json",
        png=report("results/{cohort}/{case}/calibration.png", category="calibrate"),
    log:
        "results/{cohort}/logs/calibrate/{case}.log",
    benchmark:
        "results/{cohort}/benchmarks/calibrate/{case}.tsv",
    threads: 1
    resources:
        mem_mb=mem_mb(1500, 16),
        runtime=15,
    params:
        cli=BONEDRR,
        args=calibrate_args,
    conda:
        "../../envs/calibrate.yaml"
    shell:
        "{params.cli} calibrate --ct {input.ct} --labels {input.labels} --case {input.case} "
        "--out results/{wildcards.cohort}/{wildcards.case} {params.args} 2> {log}"
