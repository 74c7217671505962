# HDF5 training shards of a cohort (bonedrr.shards; layout in docs/shards.md). The whole folder is
# replaced atomically; manifest.json is written last.


rule pack_shards:
    input:
        unpack(pack_inputs),
        checkpoints=checkpoint_statuses(("ingest", "segment")),
    output:
        manifest="results/{cohort}/shards/manifest.json",
        index="results/{cohort}/shards/index.csv",
        splits="results/{cohort}/shards/splits.json",
        excluded="results/{cohort}/shards/excluded.tsv",
    log:
        "results/{cohort}/logs/pack_shards.log",
    benchmark:
        "results/{cohort}/benchmarks/pack_shards.tsv",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=120,
    params:
        cli=BONEDRR,
        cases=lambda wc, input: " ".join(str(Path(p).parent) for p in input if p.endswith("case.json")),
        args=pack_args,
    conda:
        "../../envs/pack.yaml"
    shell:
        "{params.cli} pack --cases {params.cases} --out results/{wildcards.cohort}/shards "
        "--cohort {wildcards.cohort} {params.args} 2> {log}"
