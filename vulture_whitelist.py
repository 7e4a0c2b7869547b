"""Names that vulture (make lint) reports as unused but that are used where it cannot look: by
the workflow's rule files, by a library calling them back (http.server, html.parser), by pytest
(fixtures, pytestmark), through getattr, or as attributes another library reads. Each entry
says who uses it."""

from vulture.whitelist_utils import Whitelist

_ = Whitelist()

# workflow/rules/common.smk
_.refresh_digests
_.model_digest_file
_.lock_note
_.record_run
_.forget_run

# a Resources field, filled from the config's resources section by settings._build (the
# workflow reads the config key: workflow/rules/dissect.smk)
_.keep_activations

# read by torch: torch.backends.cudnn.benchmark (bench/bench.py)
_.benchmark
# a ConceptTally field, read through getattr over ConceptTally.FIELDS (dissection/tally.py)
_.category_images

# pytest: module marks and fixtures requested by parameter name or autouse
_.pytestmark
_._fast
_.small_chunks
_.one_thread
_.slurm_cluster

# http.server.BaseHTTPRequestHandler / ThreadingHTTPServer hooks (tests/loopback_http.py)
_.protocol_version
_.log_message
_.do_HEAD
_.do_GET
_.close_connection
_.daemon_threads

# html.parser.HTMLParser callbacks (tests/test_report_html.py)
_.handle_starttag
_.handle_endtag
_.handle_data

# read by zipfile (tests/test_download.py) and by selenium's ChromeOptions (test_report_browser.py)
_.create_system
_.binary_location

# read by the workflow's rules (workflow/rules/common.smk planned())
_.runtime_min

# called by the workflow's rules (workflow/rules/common.smk, through `itargets`)
_.ablation_models
_.adversarial_models
_.class_index
