# BMD targets per hip: DRR-BMD, QCT vBMD and DXA aBMD (bonedrr.bmd).


rule bmd:
    input:
        density="results/{cohort}/{case}/density.nii.gz",
        labels="results/{cohort}/{case}/labels.nii.gz",
        drr="results/{cohort}/{case}/drr.h5",
        case="results/{cohort}/{case}/case.json",
        calibration="results/{cohort}/{case}/calibration.json",
    output:
        "results/{cohort}/{case}/bmd.json",
    log:
        "results/{cohort}/logs/bmd/{case}.log",
    benchmark:
        "results/{cohort}/benchmarks/bmd/{case}.tsv",
    threads: 1
    resources:
        mem_mb=mem_mb(1500, 16),
        runtime=10,
    params:
        cli=BONEDRR,
        args=bmd_args,
    conda:
        "../../envs/pack.yaml"
    shell:
        "{params.cli} bmd --density {input.density} --labels {input.labels} --drr {input.drr} "
        "--case {input.case} --calibration {input.calibration} --out {output} {params.args} 2> {log}"


rule bmd_summary:
    input:
        checkpoints=checkpoint_statuses(("ingest", "segment")),
        records=lambda wc: expand("results/{{cohort}}/{case}/bmd.json", case=packable_cases(wc.cohort)),
    output:
        "results/{cohort}/qc/bmd.tsv",
    log:
        "results/{cohort}/logs/bmd_summary.log",
    params:
        cli=BONEDRR,
        cases=lambda wc, input: " ".join(str(Path(p).parent) for p in input.records),
    conda:
        "../../envs/pack.yaml"
    shell:
        "{params.cli} bmd-summary --cases {params.cases} --out {output} 2> {log}"
