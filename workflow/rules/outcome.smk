# Each case's outcome (reached the end, or where and why it failed) and each cohort's failures table
# (bonedrr.outcome).


rule case_outcome:
    input:
        unpack(case_outcome_inputs),
    output:
        "results/{cohort}/{case}/outcome.json",
    log:
        "results/{cohort}/logs/case_outcome/{case}.log",
    params:
        cli=BONEDRR,
        # a dry run, before the checkpoint, shows the status file unnamed
        status=lambda wc, input: input.status if "status" in input.keys() else input[0],
        pose=lambda wc, input: f"--pose {input.pose}" if "pose" in input.keys() else "",
        segment=lambda wc, input: f"--segment-status {input.segment_status}" if "segment_status" in input.keys() else "",
    conda:
        "../../envs/ingest.yaml"
    shell:
        "{params.cli} case-outcome --case-id {wildcards.case} --ingest-status {params.status} {params.segment} {params.pose} "
        "--out {output} 2> {log}"


rule failures:
    input:
        lambda wc: expand("results/{{cohort}}/{case}/outcome.json", case=CASES[wc.cohort]),
    output:
        report("results/{cohort}/qc/failures.tsv", category="failures", caption="../report/failures.rst"),
    log:
        "results/{cohort}/logs/failures.log",
    params:
        cli=BONEDRR,
    conda:
        "../../envs/ingest.yaml"
    shell:
        "{params.cli} failures --outcomes {input} --out {output} 2> {log}"
