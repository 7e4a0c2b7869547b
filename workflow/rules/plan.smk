# The resource plan (cnnvis_pipeline/plan.py, as `cnnvis plan` prints it): every dissection job's
# memory, disk and time, which the rules request as resources, so SLURM jobs ask for what they
# need. A job over `resources.max_mem_mb` or Snakemake's `--resources mem_mb=` is refused here,
# at `snakemake -n`, with its estimate and what to change. Layer shapes are cached in
# .snakemake/cnnvis/plan/ (a cache, not a result: torch is imported only when it misses).
# Functions only: included after common.smk, before the rule files that use them.
from cnnvis_pipeline import plan as cplan


def _global_mem_mb():
    try:
        value = workflow.global_resources["mem_mb"]
    except (KeyError, TypeError):
        return None
    value = getattr(value, "value", value)
    return int(value) if isinstance(value, (int, float)) else None


def _plan():
    limits = [
        (config["resources"].get("max_mem_mb"), "resources.max_mem_mb"),
        (_global_mem_mb(), "--resources mem_mb"),
    ]
    limit = min((x for x, _ in limits if x), default=None)  # for unit_parts: auto
    try:
        jobs = cplan.workflow_plan(config, MODELS, cores=_cores(), limit=limit)
    except cplan.SizeUnknown as e:
        # e.g. a url: archive not downloaded yet: the jobs run with the profile's resources
        if workflow.is_main_process:
            print(f"resource plan: none yet ({e})", file=sys.stderr)
        return {}
    except CnnvisError as e:
        raise WorkflowError(f"resource plan: {e}") from None
    problems = [
        line for limit, where in limits for line in cplan.over_limit(jobs, limit, where)
    ]
    # refused by the main process only: a cluster job re-reads the Snakefile once the dataset is
    # prepared, and its own estimate (from the prepared arrays) must not stop it
    if problems and workflow.is_main_process:
        raise WorkflowError(
            "jobs that would not fit in memory:\n" + "\n".join(problems)
        )
    return {(j.rule, j.model, j.layer, j.part): j for j in jobs}


PLAN = _plan()
PLANNED_RULES = {key[0] for key in PLAN}
PLAN_GPU = str(config["resources"]["device"]).startswith("cuda")


def _factory_unit_problems():
    """`units:` of the factory models against the layer shapes the plan measured (cached: no
    second build); their layer problems were refused by the plan already."""
    if not workflow.is_main_process:
        return []
    size = None
    problems = []
    for name, spec in MODELS.items():
        if spec.get("factory") and spec.get("units"):
            size = size or cplan.dataset_size(config).image_size
            shapes = cplan.model_shape(dict(spec, name=name), size).layers
            problems += [
                f"config: models.{spec.get('series') or name}.{p}"
                for p in precheck.unit_problems(spec, shapes)
            ]
    return list(dict.fromkeys(problems))


_problems = _factory_unit_problems()
if _problems:
    raise WorkflowError(
        "invalid configuration: "
        + (
            _problems[0]
            if len(_problems) == 1
            else f"{len(_problems)} problems:\n"
            + "\n".join(f"  {m}" for m in _problems)
        )
    )


def planned(rule):
    """A rule's resources from the plan: mem_mb, disk_mb and runtime (minutes; GPU times when
    resources.device is cuda, CPU times otherwise)."""

    # (no "rule", a space and a colon on one line: snakemake --lint would count it as a rule)
    planned_here = rule in PLANNED_RULES  # no plan yet, or none for this one
    if not planned_here:
        return {}

    def job(wc):
        part = wc.get("shard", wc.get("part", ""))
        return cplan.find_job(
            PLAN, rule, wc.get("model", ""), wc.get("layer", ""), part
        )

    return {
        "mem_mb": lambda wc: job(wc).mem_mb,
        "disk_mb": lambda wc: job(wc).disk_mb,
        "runtime": lambda wc: job(wc).runtime_min(PLAN_GPU),
    }


# A layer too large for one job is split by units (plan.layer_jobs; resources.unit_parts): its
# layer_units jobs, one per part, then layer_tables merging them (dissect.smk).
def unit_parts(model, layer):
    """The parts a layer's units are split into (the plan's choice, resources.unit_parts):
    1 = one layer_tables job; k > 1 = k layer_units jobs and layer_tables merging them.
    """
    job = PLAN.get(("layer_tables", model, layer, ""))
    if job is not None:
        return job.unit_parts
    given = config["resources"]["unit_parts"]  # no plan yet (a dataset of unknown size)
    return 1 if given == "auto" else int(given)


def layer_tables_input(wildcards):
    """Every shard's extraction (one part), or the layer's unit parts (layer_units)."""
    k = unit_parts(wildcards.model, wildcards.layer)
    if k == 1:
        return expand(f"results/{wildcards.model}/extract/{{shard}}", shard=SHARDS)
    return [unit_part_file(wildcards.model, wildcards.layer, i, k) for i in range(k)]


def unit_part_file(model, layer, part, parts):
    return f"results/{model}/{layer}/unit_parts/{part}-{parts}.npz"


# A layer's compositional explanations in parts (plan.compositional_jobs): `resources.shards`
# parts, or more when a part would not fit the memory limit.
def compositional_parts(model, layer):
    """How many compositional_shard jobs explain the layer's units."""
    want = ("compositional_shard", model, layer)
    found = sum(1 for key in PLAN if key[:3] == want)
    return found or len(SHARDS)


def compositional_part_files(wildcards):
    k = compositional_parts(wildcards.model, wildcards.layer)
    return [
        f"results/{wildcards.model}/compositional/{wildcards.layer}/{i}-{k}.parquet"
        for i in range(k)
    ]
