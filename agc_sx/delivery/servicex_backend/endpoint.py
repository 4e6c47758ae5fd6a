"""Which server: the ``servicex.yaml`` the client would read, the endpoint, a short pre-flight, our cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath

from ...errors import ServiceXError
from ...utils import sha256_text
from ._scrub import _Scrubber

PREFLIGHT_TIMEOUT_S = 5.0


CACHE_DIRNAME = ".servicex-cache"


@dataclass(frozen=True)
class Endpoint:
    """One ServiceX endpoint of ``servicex.yaml``; the token stays out of every message."""
    name: str
    url: str
    token: str
    config_file: str | None


def resolve_endpoint(servicex_config: Path | None, endpoint: str | None) -> Endpoint:
    """Find ``servicex.yaml`` / ``.servicex`` the client's way (or the given file) and pick the endpoint."""
    from servicex.configuration import Configuration

    if servicex_config is not None and not Path(servicex_config).is_file():
        raise ServiceXError(f"ServiceX config {servicex_config} does not exist")
    try:
        cfg = Configuration.read(str(servicex_config) if servicex_config else None)
    except NameError:
        raise ServiceXError(
            "no servicex.yaml or .servicex found (searched this folder, its parents and your home folder); "
            "pass --servicex-config PATH or use --backend local"
        ) from None
    except Exception as err:
        raise ServiceXError(f"cannot read the ServiceX config: {type(err).__name__}") from None
    endpoints = cfg.endpoint_dict()
    if not endpoints:
        raise ServiceXError(f"{cfg.config_file}: no api_endpoints")
    name = endpoint or cfg.default_endpoint or cfg.api_endpoints[0].name
    if name not in endpoints:
        raise ServiceXError(
            f"endpoint {name!r} is not in {cfg.config_file} (it has: {', '.join(endpoints)})"
        )
    ep = endpoints[name]
    return Endpoint(name, ep.endpoint.rstrip("/"), ep.token or "", cfg.config_file)


def preflight(ep: Endpoint, scrub: _Scrubber, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """``GET /servicex`` with a short timeout: a dead or broken server fails in seconds, not minutes."""
    import httpx

    try:
        r = httpx.get(f"{ep.url}/servicex", timeout=timeout)
    except httpx.HTTPError as err:
        raise ServiceXError(
            f"ServiceX endpoint {ep.name} at {ep.url} is unreachable ({type(err).__name__}: {scrub(str(err))})"
        ) from None
    if r.status_code in (401, 403):
        raise ServiceXError(f"ServiceX endpoint {ep.name} at {ep.url} refused access (HTTP {r.status_code})")
    if r.status_code >= 400:
        raise ServiceXError(f"ServiceX endpoint {ep.name} at {ep.url} answered HTTP {r.status_code}")
    try:
        info = r.json()
        codegens = info.get("code-gen-image", {})
    except (ValueError, AttributeError):
        raise ServiceXError(f"{ep.url} does not look like a ServiceX server (GET /servicex is not JSON)") from None
    if "uproot" not in codegens:
        raise ServiceXError(
            f"ServiceX endpoint {ep.name} has no uproot transformer (it has: {', '.join(codegens) or 'none'})"
        )


def _cache_dir(output_dir: Path, ep: Endpoint) -> Path:
    """Our cache for the client: under the output folder, one per server URL (the client's key ignores it)."""
    return output_dir.resolve() / CACHE_DIRNAME / sha256_text(ep.url)[:12]


def _client_cache_arg(cache: Path) -> str:
    """Spell ``cache`` so that the client keeps it where it is.

    The client moves any cache path whose first component is ``/tmp`` under ``$TMPDIR``; a path relative to
    the working directory escapes that rule, and the client resolves its downloads to absolute paths.
    """
    absolute = cache.resolve()
    candidates = [str(absolute), os.path.relpath(absolute)]
    for c in candidates:
        parts = PurePath(c).parts
        if len(parts) < 2 or parts[1] != "tmp":
            return c
    return str(absolute)
