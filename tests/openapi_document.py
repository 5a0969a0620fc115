"""The node's OpenAPI document as the tests read it."""

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENAPI_PATH = os.path.join(REPO, "metacenter", "openapi.json")

with open(OPENAPI_PATH, encoding="utf-8") as _f:
    DOCUMENT = json.load(_f)


def resolve(obj):
    """Follow local $refs to the schema or parameter they name."""
    while isinstance(obj, dict) and "$ref" in obj:
        target = DOCUMENT
        for part in obj["$ref"].lstrip("#/").split("/"):
            target = target[part]
        obj = target
    return obj
