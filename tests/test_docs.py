"""The docs stay in step with the code: every setting is in docs/settings.md's table, every route has a curl
example in docs/api.md."""

import re

from service.app import create_app
from service.settings import Settings
from harness.server import REPO

SETTINGS = (REPO / "docs" / "settings.md").read_text()
API = (REPO / "docs" / "api.md").read_text()
PARAMETER_EXAMPLES = {"item_id": r"\d+"}  # what a path parameter looks like in the examples; others: any segment


def test_every_setting_is_in_the_settings_table():
    documented = set(re.findall(r"^\| `(REID_[A-Z0-9_]+)` \|", SETTINGS, flags=re.M))
    assert documented == {f"REID_{name.upper()}" for name in Settings.model_fields}


def test_the_settings_table_names_the_default_model_that_ships():
    default = Settings.model_fields["model_path"].default.relative_to(REPO).as_posix()
    assert f"| `REID_MODEL_PATH` | `{default}` |" in SETTINGS


def test_every_route_has_a_curl_example():
    # path_format: the path without its converters ({person_id:path} is {person_id})
    routes = {
        route.path_format for route in create_app(Settings()).routes if getattr(route, "include_in_schema", False)
    }
    examples = " ".join(line for line in API.splitlines() if line.startswith("curl"))
    for path in routes:
        pattern = re.sub(
            r"\\\{(\w+)\\\}", lambda name: PARAMETER_EXAMPLES.get(name.group(1), r"[^/\s']+"), re.escape(path)
        )
        assert re.search(rf"8000{pattern}(['\s?]|$)", examples), path
