# Ingest: each case's CT and radiograph, checked and converted (bonedrr.ingest).
#
# A checkpoint: a case whose input cannot be used is recorded (status/ingest.json, ok false, with the
# reason) instead of failing the job, so the workflow goes on with the other cases and leaves this
# one out of everything downstream (bonedrr.outcome). Files of a good case are written to a staging
# folder and moved into place by the ingest rule.

localrules:
    ingest,


checkpoint ingest_check:
    input:
        unpack(ingest_inputs),
    output:
        status="results/{cohort}/{case}/status/ingest.json",
    log:
        "results/{cohort}/logs/ingest/{case}.log",
    benchmark:
        "results/{cohort}/benchmarks/ingest/{case}.tsv",
    threads: 1
    resources:
        mem_mb=mem_mb(1500, 12),
        runtime=15,
    params:
        cli=BONEDRR,
        args=ingest_args,
        staged=staging_dir,
    conda:
        "../../envs/ingest.yaml"
    shell:
        "{params.cli} --status {output.status} ingest --case-id {wildcards.case} "
        "--cohort {wildcards.cohort} --out {params.staged} {params.args} 2> {log}"


# Takes its checkpoint's inputs and params too, so that a changed input or setting reruns it (see
# rule segment).
rule ingest:
    input:
        unpack(ingest_inputs),
        status="results/{cohort}/{case}/status/ingest.json",
    output:
        ct="results/{cohort}/{case}/ct.nii.gz",
        xray="results/{cohort}/{case}/xray.nii.gz",
        case="results/{cohort}/{case}/case.json",
    log:
        "results/{cohort}/logs/ingest_accept/{case}.log",
    params:
        cli=BONEDRR,
        staged=staging_dir,
        checked_with=ingest_args,
    conda:
        "../../envs/ingest.yaml"
    shell:
        "{params.cli} accept-staged --staged {params.staged} --out results/{wildcards.cohort}/{wildcards.case} "
        "ct.nii.gz xray.nii.gz case.json 2> {log}"


rule ingest_overview:
    input:
        checkpoints=checkpoint_statuses(("ingest",)),
        records=lambda wc: expand("results/{{cohort}}/{case}/case.json", case=ingested_cases(wc.cohort)),
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
        cases=lambda wc, input: " ".join(str(Path(p).parent) for p in input.records),
    conda:
        "../../envs/ingest.yaml"
    shell:
        "{params.cli} ingest-overview --cases {params.cases} --png {output.png} --table {output.table} 2> {log}"
