# 2D/3D registration of each CT to its radiograph (bonedrr.register).


rule register:
    input:
        density="results/{cohort}/{case}/density.nii.gz",
        labels="results/{cohort}/{case}/labels.nii.gz",
        xray="results/{cohort}/{case}/xray.nii.gz",
        case="results/{cohort}/{case}/case.json",
    output:
        pose="results/{cohort}/{case}/pose.json",
        overlay=report("results/{cohort}/{case}/overlay.png", category="register"),
    log:
        "results/{cohort}/logs/register/{case}.log",
    benchmark:
        "results/{cohort}/benchmarks/register/{case}.tsv",
    threads: 2
    resources:
        mem_mb=mem_mb(2000, 16),
        runtime=30,
        gpu=gpus(),
    params:
        cli=BONEDRR,
        args=register_args,
    conda:
        "../../envs/register.yaml"
    shell:
        "{params.cli} register --density {input.density} --labels {input.labels} --xray {input.xray} "
        "--case {input.case} --out {output.pose} --overlay {output.overlay} {params.args} 2> {log}"


rule registration_summary:
    input:
        checkpoints=checkpoint_statuses(("ingest", "segment")),
        records=lambda wc: expand("results/{{cohort}}/{case}/pose.json", case=downstream_cases(wc.cohort)),
    output:
        table=report("results/{cohort}/qc/registration.tsv", category="register",
                     caption="../report/registration.rst"),
        png=report("results/{cohort}/qc/registration.png", category="register",
                   caption="../report/registration_png.rst"),
    log:
        "results/{cohort}/logs/registration_summary.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cli=BONEDRR,
        cases=lambda wc, input: " ".join(str(Path(p).parent) for p in input.records),
    conda:
        "../../envs/register.yaml"
    shell:
        "{params.cli} registration-summary --cases {params.cases} --out {output.table} --png {output.png} 2> {log}"
