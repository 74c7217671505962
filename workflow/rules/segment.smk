# Segmentation with nnU-Net v2 (bonedrr.segment): a model trained on the cohort's labelled cases
# (segmentation.model: train) or a given model folder segments every case into canonical labels.


rule train_segmenter:
    input:
        unpack(train_segmenter_inputs),
    output:
        model=directory("results/{cohort}/segmenter/model"),
        progress=report("results/{cohort}/qc/segmenter_training.png", category="segment",
                        caption="../report/segmenter_training.rst"),
    log:
        "results/{cohort}/logs/train_segmenter.log",
    benchmark:
        "results/{cohort}/benchmarks/train_segmenter.tsv",
    threads: workflow.cores
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 720 * attempt,
        gpu=gpus(),
    params:
        cli=BONEDRR,
        args=train_segmenter_args,
        labels=train_segmenter_labels,
    conda:
        "../../envs/segment.yaml"
    shell:
        "{params.cli} train-segmenter --ct {input.ct} --labels {params.labels} "
        "--workdir results/{wildcards.cohort}/segmenter/work --out {output.model} "
        "--progress-png {output.progress} --threads {threads} {params.args} 2> {log}"


# A checkpoint, like ingest: an empty or implausible segmentation is recorded (status/segment.json,
# with the reason; its record and overlay stay in the staging folder for review) and the case goes no
# further, while the other cases go on.
checkpoint segment_check:
    input:
        unpack(segment_inputs),
    output:
        status="results/{cohort}/{case}/status/segment.json",
    log:
        "results/{cohort}/logs/segment/{case}.log",
    benchmark:
        "results/{cohort}/benchmarks/segment/{case}.tsv",
    threads: 1
    resources:
        mem_mb=mem_mb(3000, 40),
        runtime=30,
        gpu=gpus(),
    params:
        cli=BONEDRR,
        args=segment_args,
        staged=lambda wc: f"results/{wc.cohort}/{wc.case}/.staged-segment",
    conda:
        "../../envs/segment.yaml"
    shell:
        "{params.cli} --status {output.status} segment --ct {input.ct} --model {input.model} --case {input.case} "
        "--out {params.staged}/labels.nii.gz --record {params.staged}/segmentation.json "
        "--overlay {params.staged}/segmentation.png --threads {threads} {params.args} 2> {log}"


localrules:
    segment,


# The accepting rules take their checkpoint's inputs and params too: Snakemake (9.27) does not rerun
# the jobs after a checkpoint whose outputs exist when the checkpoint reruns (snakemake/snakemake#3879),
# so a retrained model or a changed setting would leave the old labels in place; with them, this rule's
# own rerun is decided when the DAG is built, and everything after it follows.
rule segment:
    input:
        unpack(segment_inputs),
        status="results/{cohort}/{case}/status/segment.json",
    output:
        labels="results/{cohort}/{case}/labels.nii.gz",
        record="results/{cohort}/{case}/segmentation.json",
        overlay=report("results/{cohort}/{case}/segmentation.png", category="segment"),
    log:
        "results/{cohort}/logs/segment_accept/{case}.log",
    params:
        cli=BONEDRR,
        staged=lambda wc: f"results/{wc.cohort}/{wc.case}/.staged-segment",
        checked_with=segment_args,  # see above: a changed setting reruns this too
    conda:
        "../../envs/segment.yaml"
    shell:
        "{params.cli} accept-staged --staged {params.staged} --out results/{wildcards.cohort}/{wildcards.case} "
        "labels.nii.gz segmentation.json segmentation.png 2> {log}"


rule segmentation_summary:
    input:
        checkpoints=checkpoint_statuses(("ingest", "segment")),
        records=lambda wc: expand("results/{{cohort}}/{case}/segmentation.json", case=downstream_cases(wc.cohort)),
    output:
        table=report("results/{cohort}/qc/segmentation.tsv", category="segment",
                     caption="../report/segmentation.rst"),
        png=report("results/{cohort}/qc/segmentation.png", category="segment",
                   caption="../report/segmentation.rst"),
    log:
        "results/{cohort}/logs/segmentation_summary.log",
    params:
        cli=BONEDRR,
        cases=lambda wc, input: " ".join(str(Path(p).parent) for p in input.records),
    conda:
        "../../envs/segment.yaml"
    shell:
        "{params.cli} segmentation-summary --cases {params.cases} --out {output.table} --png {output.png} 2> {log}"
