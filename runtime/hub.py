"""Models named by a Hugging Face id: ``org/name`` or ``org/name-GGUF:Q4_K_M``.

A GGUF repo is read as llama.cpp's ``-hf`` reads it (``common/download.cpp`` in the
llama.cpp that llama-cpp-python vendors):

- the model files are the repo's ``.gguf`` files except projectors, importance matrices
  and speculative heads (``mmproj``, ``imatrix``, ``mtp-``, ...), and bridge's own
  ``.draft.gguf``, in the repo's (sorted) order;
- a tag picks the first whose path holds ``<TAG>.`` or ``<TAG>-``, case-insensitively;
  without a tag, ``Q4_K_M``, then ``Q8_0``, then the first model file;
- a split GGUF (``<prefix>-00001-of-00003.gguf``) is chosen by its first part and fetched
  whole; llama.cpp finds the other parts beside the first.

One difference, on purpose: the tag must start the quant name (``-Q4_K_M.`` but not
``-IQ4_K_M.``), which llama.cpp's unanchored search does not require.

A transformers repo (``config.json`` and safetensors) is what ``bridge export`` converts;
only the config, tokenizer and weight files are fetched. Files land in the standard HF
cache (``runtime.hub_download``). Online, one API call (the model info: the revision check
and the file list) precedes any download, and a second run downloads nothing; offline
(``HF_HUB_OFFLINE``, or the Hub unreachable), the cache alone answers.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runtime import keys
from runtime.hub_download import HubEnv, HubError, fetch_file

__all__ = ["HubError", "HubModel", "HubSpec", "choose_gguf", "gguf_quants", "resolve"]

log = logging.getLogger(__name__)

# "org/name" or "org/name:TAG", the shape llama.cpp's -hf takes
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<tag>[\w.-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SPLIT = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$", re.IGNORECASE)
_NAME_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
# llama.cpp's gguf_filename_is_model: files in a GGUF repo that are not the model
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
# llama.cpp's default quant, then its fallback, when no tag is given
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")
# what `bridge export` reads from a transformers repo (huggingface_hub's allow_patterns)
HF_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
               "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "chat_template*")

Want = Literal["gguf", "export"]


@dataclass(frozen=True)
class HubSpec:
    """A parsed hub id: ``repo`` (``org/name``), an optional quant ``tag``, and the
    ``revision`` (a branch, tag or commit; None is ``main``)."""

    repo: str
    tag: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, revision: str | None = None) -> HubSpec | None:
        """The spec ``text`` names, or None when it does not look like a hub id (a
        ``.gguf`` name, a path that starts with ``/``, ``.`` or ``~``)."""
        m = _SPEC.match(text)
        if m is None or text.lower().endswith(".gguf") or text[0] in "./~":
            return None
        return cls(m["repo"], m["tag"], revision or None)

    @property
    def rev(self) -> str:
        return self.revision or "main"

    def __str__(self) -> str:
        s = self.repo + (f":{self.tag}" if self.tag else "")
        return s + (f" (revision {self.revision})" if self.revision else "")


@dataclass(frozen=True)
class HubModel:
    """What a hub spec resolved to, in the HF cache.

    Args:
        kind: ``gguf`` (``path`` is the GGUF, its first part when split) or ``hf``
            (``path`` is the snapshot folder of a transformers checkpoint).
        files: the repo paths that were needed (all present now).
        commit: the commit they come from.
        downloaded: bytes were fetched by this call (False: the cache had everything).
    """

    spec: HubSpec
    kind: Literal["gguf", "hf"]
    path: Path
    files: tuple[str, ...]
    commit: str
    downloaded: bool


# -- choosing files (pure functions of the repo's file list) -----------------------------

@dataclass(frozen=True)
class _GgufName:
    prefix: str  # the path without ".gguf" and the split suffix, quant tag included
    tag: str  # the quant tag the name ends with, upper case ("" when none)
    index: int
    count: int


def _gguf_name(path: str) -> _GgufName | None:
    if not path.lower().endswith(".gguf"):
        return None
    prefix, index, count = path[: -len(".gguf")], 1, 1
    if m := _SPLIT.match(prefix):
        prefix, index, count = m[1], int(m[2]), int(m[3])
    tag = m[1].upper() if (m := _NAME_TAG.search(prefix)) else ""
    return _GgufName(prefix, tag, index, count)


def _is_model_gguf(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return (name.lower().endswith(".gguf") and not name.endswith(keys.DRAFT_SUFFIX)
            and not any(word in name for word in _NOT_MODEL))


def choose_gguf(files: Sequence[str], tag: str | None) -> tuple[str, ...] | None:
    """The GGUF ``tag`` picks among a repo's ``files`` (llama.cpp's rule, module
    docstring), with its other split parts after it; None when nothing matches."""
    models = sorted(f for f in files if _is_model_gguf(f))
    tags = (tag,) if tag else DEFAULT_TAGS
    for t in tags:
        wanted = re.compile(r"(?:^|[-._/])" + re.escape(t) + r"[.-]", re.IGNORECASE)
        for f in models:
            name = _gguf_name(f)
            if wanted.search(f) and name is not None and name.index == 1:
                return _with_parts(models, f)
    if tag is None:
        for f in models:
            name = _gguf_name(f)
            if name is not None and name.index == 1:
                return _with_parts(models, f)
    return None


def _with_parts(models: list[str], first: str) -> tuple[str, ...]:
    name = _gguf_name(first)
    assert name is not None
    if name.count == 1:
        return (first,)
    parts = sorted((n.index, f) for f in models
                   if (n := _gguf_name(f)) and (n.prefix, n.count) == (name.prefix, name.count))
    if [i for i, _ in parts] != list(range(1, name.count + 1)):
        raise HubError(f"{first} is split in {name.count} parts, and only parts "
                       f"{', '.join(str(i) for i, _ in parts)} are there")
    return tuple(f for _, f in parts)


def gguf_quants(files: Sequence[str]) -> list[str]:
    """The quant tags a repo's model GGUFs carry, in file order (a name without a tag
    is listed whole)."""
    out: list[str] = []
    for f in sorted(files):
        name = _gguf_name(f)
        if name is None or not _is_model_gguf(f) or name.index != 1:
            continue
        label = name.tag or f
        if label not in out:
            out.append(label)
    return out


def _hf_files(files: Sequence[str]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    top = [f for f in files if "/" not in f]  # sub-folders hold other formats (onnx/...)
    return sorted(filter_repo_objects(top, allow_patterns=list(HF_PATTERNS)))


def _plan(spec: HubSpec, files: Sequence[str], want: Want, where: str
          ) -> tuple[Literal["gguf", "hf"], tuple[str, ...]]:
    """Which files ``spec`` needs from a repo holding ``files``; ``where`` says whose list
    it is for the errors ("" for the Hub's, " in the cache")."""
    hf = _hf_files(files)
    has_weights = "config.json" in hf and any(fnmatch.fnmatch(f, "*.safetensors") for f in hf)
    if want == "export" and spec.tag is None and has_weights:
        return "hf", tuple(hf)  # the original weights convert better than a requantization
    chosen = choose_gguf(files, spec.tag)
    if chosen is not None:
        draft = chosen[0].removesuffix(keys.FULL_SUFFIX) + keys.DRAFT_SUFFIX
        extra = (draft,) if len(chosen) == 1 and draft in files else ()
        return "gguf", chosen + extra  # a bridge draft published beside it comes too
    quants = gguf_quants(files)
    if spec.tag is not None and quants:
        raise HubError(f"{spec.repo} has no GGUF for {spec.tag!r}{where}; it has "
                       f"{', '.join(quants)} (e.g. {spec.repo}:{quants[0]})")
    if has_weights and want == "export":  # a tag on a transformers repo
        raise HubError(f"{spec.repo} has no GGUF files{where}, only a transformers "
                       f"checkpoint: export it without the tag, `bridge export {spec.repo} "
                       f"--quant {spec.tag}`")
    if has_weights:
        raise HubError(f"{spec.repo} holds a transformers checkpoint, not GGUF: make a GGUF "
                       f"and its draft with `bridge export {spec.repo} --prune 0.25`, then "
                       "run the file it writes")
    if want == "export":
        raise HubError(f"{spec.repo} has no GGUF and no safetensors checkpoint (config.json "
                       f"and *.safetensors){where}: nothing bridge can read")
    raise HubError(f"{spec.repo} has no GGUF file{where}")


# -- resolving ------------------------------------------------------------------------------

def resolve(spec: HubSpec, want: Want = "gguf") -> HubModel:
    """The files ``spec`` names, in the HF cache, downloaded if they are not there yet.

    Args:
        spec: the parsed id.
        want: ``gguf`` (the runtime: a GGUF only) or ``export`` (a transformers
            checkpoint when the repo has one and no tag was given, else a GGUF).

    Raises:
        HubError: a one-line reason and its fix (no such repo or revision, gated, no
            matching GGUF, offline with nothing cached, a broken download, a full disk).
    """
    env = HubEnv.current()
    if env.offline:
        return _from_cache(env, spec, want, "offline (HF_HUB_OFFLINE is set)")
    if spec.revision and _COMMIT.match(spec.revision):
        try:  # a commit never changes: the cache can answer without asking the Hub
            return _from_cache(env, spec, want, "")
        except HubError:
            pass
    try:
        return _from_hub(env, spec, want)
    except HubError:
        raise
    except Exception as e:  # huggingface_hub's and httpx2's errors, explained in one line
        if _unreachable(e):
            log.warning("cannot reach %s (%s); looking in the Hugging Face cache",
                        env.endpoint, type(e).__name__)
            return _from_cache(env, spec, want, f"cannot reach {env.endpoint} "
                               f"({type(e).__name__})")
        raise _explain(e, spec, env) from None


def _from_hub(env: HubEnv, spec: HubSpec, want: Want) -> HubModel:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=env.endpoint, token=env.token).model_info(spec.repo,
                                                                    revision=spec.revision)
    assert info.sha, "the Hub's model info always carries the commit"
    files = [s.rfilename for s in info.siblings or ()]
    kind, needed = _plan(spec, files, want, "")
    snapshot = env.storage(spec.repo) / "snapshots" / info.sha
    missing = [f for f in needed if not (snapshot / f).is_file()]
    log.info("%s: %s at commit %s%s", spec, ", ".join(needed) if kind == "gguf" else
             f"{len(needed)} files", info.sha[:8],
             "" if missing else ", all in the Hugging Face cache")
    paths = [fetch_file(env, spec.repo, spec.rev, info.sha, f) for f in needed]
    # hf_hub_download's answer is the truth (the branch may have moved since model_info)
    path = paths[0] if kind == "gguf" else paths[0].parent
    return HubModel(spec, kind, path, tuple(needed), info.sha, bool(missing))


def _from_cache(env: HubEnv, spec: HubSpec, want: Want, why: str) -> HubModel:
    """``spec`` from the cache alone; ``why`` says why the Hub is not asked ("" when it
    need not be: a commit that is already cached)."""
    storage = env.storage(spec.repo)
    commit = spec.revision if spec.revision and _COMMIT.match(spec.revision) else None
    if commit is None:
        try:
            commit = (storage / "refs" / spec.rev).read_text().strip()
        except OSError:
            commit = None
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        looked = snapshot if snapshot is not None else storage / "refs" / spec.rev
        raise HubError(f"{why or 'not cached'}, and {spec} is not in the Hugging Face cache "
                       f"(no {looked}); run once online to download it")
    files = [p.relative_to(snapshot).as_posix() for p in sorted(snapshot.rglob("*"))
             if p.is_file()]
    try:
        kind, needed = _plan(spec, files, want, " in the cache")
    except HubError as e:
        raise HubError(f"{why}: {e}" if why else str(e)) from None
    log.info("%s: %s from the Hugging Face cache%s", spec,
             ", ".join(needed) if kind == "gguf" else f"{len(needed)} files",
             f" ({why})" if why else "")
    path = snapshot / needed[0] if kind == "gguf" else snapshot
    return HubModel(spec, kind, path, tuple(needed), snapshot.name, False)


def _unreachable(e: Exception) -> bool:
    """No answer from the Hub (as opposed to an answer that says no)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, (httpx2.TransportError, OfflineModeIsEnabled)):
        return True
    # a Hub that answers 5xx is down for now: the cache may still serve
    return isinstance(e, HfHubHTTPError) and e.response is not None \
        and e.response.status_code >= 500


def _explain(e: Exception, spec: HubSpec, env: HubEnv) -> HubError:
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{env.endpoint}/{spec.repo}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, GatedRepoError):  # before RepositoryNotFoundError, its base class
        if env.token:
            return HubError(f"{spec.repo} is gated and your token has no access yet: accept "
                            f"its terms at {page} with the account of that token")
        return HubError(f"{spec.repo} is gated: accept its terms at {page}, then {login}")
    if isinstance(e, RepositoryNotFoundError):
        private = "your token cannot see it if it is private" if env.token \
            else f"if it is private, {login}"
        # the id may be a mistyped local path just as well: say both
        return HubError(f"model not found: no file or folder {spec.repo} here, and no model "
                        f"{spec.repo} on the Hugging Face Hub ({env.endpoint}); check the "
                        f"id, and {private}")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{spec.repo} has no revision {spec.rev!r}: give a branch, tag or "
                        "commit that exists (--revision)")
    if isinstance(e, RemoteEntryNotFoundError):
        return HubError(f"a file of {spec.repo} listed by the Hub was not found when "
                        "downloaded (the repo changed meanwhile?); run again")
    if isinstance(e, DisabledRepoError):
        return HubError(f"{spec.repo} is disabled on the Hub")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        if code == 401:
            return HubError(f"the Hub refused the token (401) for {spec.repo}: check HF_TOKEN "
                            "or `hf auth login`")
        return HubError(f"the Hub answered {code} for {spec.repo}; try again later")
    return HubError(f"could not get {spec} from {env.endpoint}: {type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
