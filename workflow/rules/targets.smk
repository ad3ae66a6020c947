# Targets beside `all` (in the Snakefile): one variant, one sweep, the ablation group, or the runs alone.
# Each also rebuilds the aggregates and the report that depend on it, and nothing else that is up to date.

# A variant or sweep named like a rule would shadow it: refuse before any job, naming the config key.
_RULE_NAMES = {rule.name for rule in workflow.rules} | {"all", "runs", "ablations"}
for _name, _key in STUDY.target_keys.items():
    if _name in _RULE_NAMES:
        raise WorkflowError(
            f"invalid configuration: config key '{_key}' = '{_name}': is a workflow rule "
            f"name; taken: {', '.join(sorted(_RULE_NAMES))}"
        )


rule runs:
    input:
        eval_files(),


rule ablations:
    input:
        eval_files([STUDY.ablation_base, *STUDY.ablations] if STUDY.ablation_base else []),
        ANALYSIS_OUTPUTS,
        REPORT,


for _target, _members in [*((v, [v]) for v in VARIANTS), *SWEEPS.items()]:

    rule:
        name:
            _target
        input:
            eval_files(_members),
            ANALYSIS_OUTPUTS,
            REPORT,
