"""The job spec: a declarative FineTune or Study, validated before anything runs.

``model`` holds the two kinds, assembled from the sections in ``sections`` (what trains),
``infra`` (where it runs) and ``search`` (how a Study searches). ``loading`` turns JSON text
into them (or a list of problems that each name a field, worded by ``problems``), ``study``
expands a Study into its FineTune cells (what a study will cost is ``service.cost``). This
package imports no torch: ``backbones validate`` must stay fast.
"""

from service.spec.infra import Metrics, Output, Resources, Storage
from service.spec.loading import SpecError, load_spec, loads_spec, parse_spec
from service.spec.model import (
    API_VERSION,
    KINDS,
    SCHEMA_URL_FINETUNE,
    SCHEMA_URL_STUDY,
    FineTune,
    Spec,
    Study,
    check_micro_batch,
    run_id_for,
)
from service.spec.search import Proxy, Search
from service.spec.sections import (
    BUILTIN_DATASETS,
    Backbone,
    Dataset,
    Protocol,
    StudyDataset,
    dataset_name_from_uri,
)

__all__ = [
    "API_VERSION",
    "BUILTIN_DATASETS",
    "KINDS",
    "SCHEMA_URL_FINETUNE",
    "SCHEMA_URL_STUDY",
    "Backbone",
    "Dataset",
    "FineTune",
    "Metrics",
    "Output",
    "Protocol",
    "Proxy",
    "Resources",
    "Search",
    "Spec",
    "SpecError",
    "Storage",
    "Study",
    "StudyDataset",
    "check_micro_batch",
    "dataset_name_from_uri",
    "load_spec",
    "loads_spec",
    "parse_spec",
    "run_id_for",
]
