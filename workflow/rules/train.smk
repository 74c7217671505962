# The decomposition model (bonedrr.train): one model folder per cohort and split,
# results/models/<cohort>_<split>/ with split `all` (every fold: the model `bonedrr estimate` uses) or
# `fold<k>` (every fold but k: the cross-validation model that predicts fold k). checkpoint.pt is not a
# declared output, so a killed or failed job keeps it and the next run resumes from it.


wildcard_constraints:
    split="all|fold[0-9]+",


rule train:
    input:
        manifest="results/{cohort}/shards/manifest.json",
        index="results/{cohort}/shards/index.csv",
    output:
        model="results/models/{cohort}_{split}/model.pt",
        log_tsv="results/models/{cohort}_{split}/train_log.tsv",
        curves=report("results/models/{cohort}_{split}/curves.png", category="train",
                      caption="../report/train.rst", labels={"model": "{cohort}_{split}"}),
    log:
        "results/{cohort}/logs/train/{split}.log",
    benchmark:
        "results/{cohort}/benchmarks/train/{split}.tsv",
    threads: train_threads()
    resources:
        mem_mb=lambda wc, attempt: 6000 * attempt,
        runtime=lambda wc, attempt: 480 * attempt,
        gpu=gpus(),
    params:
        cli=BONEDRR,
        args=train_args,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cli} train --shards results/{wildcards.cohort}/shards "
        "--out results/models/{wildcards.cohort}_{wildcards.split} --threads {threads} {params.args} 2> {log}"
