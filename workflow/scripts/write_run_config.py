"""Write one run's resolved config (rule run_config). The resolution itself is gtmoe.study's."""

import yaml

with open(snakemake.output[0], "w") as handle:  # noqa: F821 - injected by Snakemake
    yaml.safe_dump(snakemake.params.resolved, handle, sort_keys=False)  # noqa: F821
with open(snakemake.log[0], "w") as handle:  # noqa: F821
    handle.write(f"resolved run config written to {snakemake.output[0]}\n")  # noqa: F821
