"""GET /v1/models and /v1/models/{id}: the server's models (llamad.models.catalog), in
OpenAI's shape with Anthropic's fields too (both families list models at this path)."""

from __future__ import annotations

import os
import time
from typing import Any

from litestar import Request, Router, get

from llamad.models.catalog import ModelNotFound, ModelSpec
from llamad.serve.models import pool_of


@get("/v1/models", sync_to_thread=False)
def list_models(request: Request) -> dict[str, Any]:
    # Both families list models at this path: OpenAI's list fields and Anthropic's
    # pagination fields side by side (each SDK ignores the other's).
    cards = [model_card(spec) for spec in pool_of(request).catalog.models.values()]
    return {"object": "list", "data": cards, "has_more": False, "first_id": cards[0]["id"], "last_id": cards[-1]["id"]}


@get("/v1/models/{model_id:path}", sync_to_thread=False)
def get_model(request: Request) -> dict[str, Any]:
    # Clients ask for names of their own (also "org/model"): each resolves as a request's
    # `model` would (to the default model, unless router.strict).
    catalog = pool_of(request).catalog
    model_id = request.path_params["model_id"]
    spec = catalog.route(model_id)
    if spec is None:
        raise ModelNotFound(model_id, list(catalog.models))
    return model_card(spec)


def model_card(spec: ModelSpec) -> dict[str, Any]:
    """A model in OpenAI's shape, with Anthropic's fields too. `created` is the GGUF file's
    modification time."""
    try:
        created = int(os.stat(spec.path).st_mtime)
    except OSError:
        created = 0
    return {
        "id": spec.name,
        "object": "model",
        "created": created,
        "owned_by": "llamad",
        "type": "model",
        "display_name": spec.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
    }


router = Router(path="/", route_handlers=[list_models, get_model])
