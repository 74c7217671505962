# BMD validation on held-out folds (bonedrr.validate): each fold's model decomposes the hips of the
# patients it never saw; metrics against every ground truth, the baseline, the JPEG and multi-pose
# sweeps, and a self-contained report.


rule validate:
    input:
        unpack(validate_inputs),
        checkpoints=checkpoint_statuses(("ingest", "segment")),
    output:
        metrics="results/validation/{cohort}/metrics.json",
        predictions="results/validation/{cohort}/predictions.csv",
        jpeg_rows="results/validation/{cohort}/jpeg.csv",
        pose_rows="results/validation/{cohort}/pose.csv",
        report=report("results/validation/{cohort}/report.html", category="validation",
                      caption="../report/validation.rst", labels={"cohort": "{cohort}", "figure": "report"}),
        scatter=report("results/validation/{cohort}/plots/scatter.png", category="validation",
                       caption="../report/validation_scatter.rst", labels={"cohort": "{cohort}", "figure": "scatter"}),
        bland_altman=report("results/validation/{cohort}/plots/bland_altman.png", category="validation",
                            caption="../report/validation_bland_altman.rst",
                            labels={"cohort": "{cohort}", "figure": "Bland-Altman"}),
        examples=report("results/validation/{cohort}/plots/examples.png", category="validation",
                        caption="../report/validation_examples.rst", labels={"cohort": "{cohort}", "figure": "examples"}),
        jpeg=report("results/validation/{cohort}/plots/jpeg.png", category="validation",
                    caption="../report/validation_jpeg.rst", labels={"cohort": "{cohort}", "figure": "JPEG"}),
        pose=report("results/validation/{cohort}/plots/pose.png", category="validation",
                    caption="../report/validation_pose.rst", labels={"cohort": "{cohort}", "figure": "multi-pose"}),
    log:
        "results/{cohort}/logs/validate.log",
    benchmark:
        "results/{cohort}/benchmarks/validate.tsv",
    threads: train_threads()
    resources:
        mem_mb=lambda wc, attempt: 6000 * attempt,
        runtime=lambda wc, attempt: 240 * attempt,
        gpu=gpus(),
    params:
        cli=BONEDRR,
        models=lambda wc: " ".join(f"results/models/{wc.cohort}_fold{k}" for k in validation_folds(wc.cohort)),
        args=validate_args,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cli} validate --shards results/{wildcards.cohort}/shards --models {params.models} "
        "--out results/validation/{wildcards.cohort} --cohort {wildcards.cohort} "
        "--cases-root results/{wildcards.cohort} --qc-dir results/{wildcards.cohort}/qc {params.args} 2> {log}"
