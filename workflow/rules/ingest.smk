# Ingest: each case's CT and radiograph, checked and converted (bonedrr.ingest).


rule ingest:
    input:
        unpack(ingest_inputs),
    output:
        ct="results/{cohort}/{case}/ct.nii.gz",
        xray="results/{cohort}/{case}/xray.nii.gz",
        case="results/{cohort}/{case}/case.json",
    log:
        "results/{cohort}/logs/ingest/{case}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(1500, 12),
        runtime=15,
    params:
        cli=BONEDRR,
        args=ingest_args,
    conda:
        "../../envs/ingest.yaml"
    shell:
        "{params.cli} ingest --case-id {wildcards.case} --cohort {wildcards.cohort} "
        "--out results/{wildcards.cohort}/{wildcards.case} {params.args} 2> {log}"


rule ingest_overview:
    input:
        lambda wc: expand("results/{{cohort}}/{case}/case.json", case=CASES[wc.cohort]),
    output:
        png=report("results/{cohort}/qc/ingest.png", category="ingest"),
        table="results/{cohort}/qc/ingest.tsv",
    log:
        "results/{cohort}/logs/ingest_overview.log",
    threads: 1
    resources:
        mem_mb=mem_mb(1000, 2),
        runtime=10,
    params:
        cli=BONEDRR,
        cases=lambda wc, input: " ".join(str(Path(p).parent) for p in input),
    conda:
        "../../envs/ingest.yaml"
    shell:
        "{params.cli} ingest-overview --cases {params.cases} --png {output.png} --table {output.table} 2> {log}"
