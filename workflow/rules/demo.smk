# The demo cohort: virtual patients made from the vendored real CT (bonedrr.demo).


rule demo_patient:
    output:
        directory("results/{cohort}/demo_input/{case}"),
    log:
        "results/{cohort}/logs/demo_patient/{case}.log",
    benchmark:
        "results/{cohort}/benchmarks/demo_patient/{case}.tsv",
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=10,
    params:
        cli=BONEDRR,
        settings=demo_args,
        index=demo_index,
    conda:
        "../../envs/demo.yaml"
    shell:
        "{params.cli} demo-cohort --out results/{wildcards.cohort}/demo_input --cases {params.index} "
        "{params.settings} 2> {log}"


rule demo_samplesheet:
    input:
        lambda wc: [demo_case_dir(wc.cohort, case) for case in CASES[wc.cohort]],
    output:
        "results/{cohort}/demo_input/samples.tsv",
    log:
        "results/{cohort}/logs/demo_samplesheet.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        cli=BONEDRR,
        settings=demo_args,
    conda:
        "../../envs/demo.yaml"
    shell:
        "{params.cli} demo-cohort --out results/{wildcards.cohort}/demo_input --samplesheet-only "
        "{params.settings} 2> {log}"
