# report.html is an output like any other: rule `report`, an input of `all`. Snakemake rebuilds it when it is
# missing and when a file it embeds, a caption or the study record changed. What else it shows (each embedded
# file's job: rule, wildcards, params) changes only with that job, which then reruns and rebuilds it too.
# Snakemake's --report is no job command, so the job runs a nested `snakemake --report` into a temporary beside
# the report and renames it over report.html: a reader, or a rerun after a kill at any moment, finds a whole
# report or none (Snakemake deletes the old one as the job starts), never part of one. The nested call gets this
# run's own config files and --config values, so no copy of the config is written anywhere.


include: "report_functions.smk"


rule report:
    input:
        ANALYSIS_OUTPUTS,
        eval_files(),
        record=ancient(STUDY_RECORD),  # what the report shows of the study is in the files it embeds
        captions=REPORT_CAPTIONS,
    output:
        REPORT,
    log:
        f"{LOGS}/report.log",
    localrule: True
    run:
        write_report(output[0], log[0])
