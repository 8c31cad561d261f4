"""The operator's OpenADR 3 virtual end node (VEN): a utility's events, read from an OpenADR 3
VTN's REST API with aiohttp (there is no maintained Python OpenADR 3 library to lean on).

Every ``poll_seconds`` it: gets an OAuth2 client-credentials token (from ``token_url``, else
the VTN's ``GET /auth/server``; again when it expires or a call answers 401); finds its own
``ven`` object by ``venName`` (creating it with a ``VEN_VEN_REQUEST`` if the VTN lets it) for
the targets the utility granted it; lists the programs it follows (``programs``, by name; all
when empty) and their events, untargeted and targeted at its names; and turns each event into
GridEvents (``openadr3_events``). An event that appears or changes is handed to
``on_events(event_id, grid_events)``, one that disappears or is over to ``on_events(id, [])``.
While events are active it files, every ``report_seconds``, one report per event of what the
site can still shed (created once with ``POST /reports``, then updated with ``PUT``).

Problems go to ``on_problem(text)`` once when they start or change, and ``on_recovered()``
once when all is well again: the VTN unreachable or refusing our credentials (everything we
had is kept), or an event we cannot obey (it is left out; if it was good before, its last good
form is kept), or a program that is not there. Credentials are files (a mounted Secret):
``client_id_file``, ``client_secret_file``, and ``ca_file`` for the VTN's certificate; only
paths are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urljoin

import aiohttp

from aifactory.controller.power.grid import DEFAULT_LEVEL_PERCENT, GridEvent
from aifactory.operators.openadr import NotForThisSite, guarded, iso_utc
from aifactory.operators.openadr3_events import grid_events_from_oa3, report_body, target_terms

__all__ = ["OpenADR3Ven", "VtnError"]

log = logging.getLogger("aifactory.openadr3")
_PAGE = 50
_MAX_PAGES = 20


class VtnError(Exception):
    """A VTN call that failed; the text says how (``unreachable (...)``, ``refused ...``);
    ``status``: the HTTP status, None when there was no answer."""

    def __init__(self, text: str, status: int | None = None) -> None:
        super().__init__(text)
        self.status = status


_NOT_JSON = object()


def _json(text: str) -> Any:
    """The decoded body (None when empty), or ``_NOT_JSON``."""
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return _NOT_JSON


def _read_secret(what: str, path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"OpenADR 3 {what} file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        value = f.read().strip()
    if not value:
        raise ValueError(f"OpenADR 3 {what} file {path} is empty")
    return value


def _same(a: Iterable[GridEvent], b: Iterable[GridEvent]) -> bool:
    """Equal but for when they arrived."""
    return [replace(e, signal_at=None) for e in a] == [replace(e, signal_at=None) for e in b]


class OpenADR3Ven:
    """See the module. Callbacks run in the loop that runs the VEN."""

    def __init__(self, vtn_url: str, ven_name: str,
                 on_events: Callable[[str, list[GridEvent]], None],
                 on_problem: Callable[[str], None], sheddable_watts: Callable[[], float], *,
                 client_id_file: str, client_secret_file: str,
                 programs: Collection[str] = (), targets: Collection[str] = (),
                 budgets: tuple[str, ...] = (),
                 levels: Mapping[int, float] = DEFAULT_LEVEL_PERCENT,
                 on_recovered: Callable[[], None] | None = None,
                 token_url: str | None = None, ca_file: str | None = None,
                 resource_name: str = "site", poll_seconds: float = 10.0,
                 report_seconds: float = 10.0, timeout_seconds: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._client_id = _read_secret("client-id", client_id_file)
        self._client_secret = _read_secret("client-secret", client_secret_file)
        if ca_file is not None and not os.path.isfile(ca_file):
            raise ValueError(f"OpenADR 3 ca_file {ca_file} does not exist")
        self._ssl: ssl.SSLContext | bool = (ssl.create_default_context(cafile=ca_file)
                                            if ca_file else True)
        self.vtn_url = vtn_url.rstrip("/")
        self.ven_name = ven_name
        self._on_events, self._on_problem, self._on_recovered = on_events, on_problem, on_recovered
        self._sheddable, self._clock = sheddable_watts, clock
        self._programs, self._targets = frozenset(programs), frozenset(targets)
        self._budgets, self._levels, self._resource = budgets, levels, resource_name
        self._token_url, self._timeout = token_url, timeout_seconds
        self._poll_seconds, self._report_seconds = poll_seconds, report_seconds
        self._token: str | None = None
        self._token_expires = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_report = 0.0
        self._ignored: set[str] = set()  # events for others, said once
        self.ven_id: str | None = None
        self.names: frozenset[str] = frozenset({ven_name, *targets})
        self.events: dict[str, list[GridEvent]] = {}  # the last good GridEvents per event id
        self.raw: dict[str, Mapping[str, Any]] = {}  # those events as the VTN gave them
        self.report_ids: dict[str, str] = {}  # event id -> our report's id at the VTN
        self.problem = ""
        self.down_since: float | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Polls in a task of the running loop (at once, then every ``poll_seconds``)."""
        if self._task is not None:
            raise RuntimeError("OpenADR3Ven already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="openadr3-ven")

    async def stop(self) -> None:
        """Stops polling and reporting and closes the HTTP session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            try:
                while True:
                    try:
                        await self.poll()
                    except Exception:  # a bug of ours must not end the VEN quietly
                        log.exception("OpenADR 3 poll of %s failed", self.vtn_url)
                    await asyncio.sleep(self._poll_seconds)
            finally:
                self._session = None

    # ----------------------------------------------------------------- one poll

    async def poll(self) -> None:
        """One round: token, our VEN object, programs, events, reports (see the module)."""
        try:
            await self._login()
            await self._register()
            programs, problems = await self._read_programs()
            events = await self._read_events(programs)
        except VtnError as exc:
            self._down(str(exc))
            return
        self.down_since = None
        now = self._clock()
        seen: set[str] = set()
        for ev in events:
            eid = str(ev.get("id", ""))
            program = programs.get(str(ev.get("programID")), {})
            got = grid_events_from_oa3(
                ev, now=now, budgets=self._budgets, levels=self._levels, names=self.names,
                program_descriptors=program.get("payloadDescriptors") or [])
            if isinstance(got, NotForThisSite):
                if eid not in self._ignored:
                    self._ignored.add(eid)
                    log.info("OpenADR 3 %s; ignored", got)
                continue
            seen.add(eid)
            if isinstance(got, str):
                problems.append(got)  # the last good form, if any, is kept
                continue
            self.raw[eid] = ev
            self._apply(eid, got)
        self._ignored &= {str(ev.get("id", "")) for ev in events}
        for eid in [e for e in self.events if e not in seen]:
            self._apply(eid, [])
        for eid in [e for e in self.raw if e not in self.events]:
            self.raw.pop(eid)
            self.report_ids.pop(eid, None)
        try:
            await self._report(now)
        except VtnError as exc:
            problems.append(f"VTN at {self.vtn_url}: report not filed: {exc}")
        self._set_problem("; ".join(problems))

    def _apply(self, eid: str, events: list[GridEvent]) -> None:
        before = self.events.get(eid)
        if before is not None and _same(before, events):
            return
        if events:
            self.events[eid] = events
        elif before is None:
            return
        else:
            self.events.pop(eid)
        guarded(self._on_events, eid, events)

    def _set_problem(self, text: str) -> None:
        if text == self.problem:
            return
        self.problem = text
        if text:
            log.warning("OpenADR 3: %s", text)
            guarded(self._on_problem, text)
        else:
            log.info("OpenADR 3: VTN at %s answers and every event is understood", self.vtn_url)
            guarded(self._on_recovered)

    def _down(self, why: str) -> None:
        if self.down_since is None:
            self.down_since = self._clock()
        self._set_problem(f"VTN at {self.vtn_url} {why} since {iso_utc(self.down_since)}; "
                          "the last good events are kept")

    # ----------------------------------------------------------------- the calls

    async def _login(self) -> None:
        if self._token is not None and self._clock() < self._token_expires:
            return
        session = self._require_session()
        url = self._token_url
        if url is None:
            info = await self._call("GET", "/auth/server", auth=False, missing_ok=True)
            found = info.get("tokenURL") if isinstance(info, Mapping) else None
            url = urljoin(self.vtn_url + "/", found) if isinstance(found, str) and found \
                else f"{self.vtn_url}/auth/token"
        form = {"grant_type": "client_credentials", "client_id": self._client_id,
                "client_secret": self._client_secret}
        try:
            async with session.post(url, data=form, ssl=self._ssl) as r:
                status, got = r.status, _json(await r.text())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise VtnError(f"unreachable (token endpoint {url}: "
                           f"{exc or type(exc).__name__})") from exc
        body = got if isinstance(got, Mapping) else {}
        if status != 200:
            raise VtnError(f"refused our client credentials (token endpoint {url}: HTTP "
                           f"{status} {body.get('error', '')}); check client-id and "
                           "client-secret in --openadr-credentials", status)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise VtnError(f"gave no access_token (token endpoint {url})")
        expires = body.get("expires_in")
        life = float(expires) if isinstance(expires, int | float) and expires > 0 else 3600.0
        self._token, self._token_expires = token, self._clock() + max(life - 30.0, life / 2)

    async def _register(self) -> None:
        vens = await self._call("GET", "/vens", params=[("venName", self.ven_name)])
        ours = [v for v in vens or [] if isinstance(v, Mapping)
                and v.get("venName") == self.ven_name]
        if not ours:
            if self.ven_id == "":  # we may not create it: said once already
                return
            try:
                created = await self._call("POST", "/vens", body={
                    "objectType": "VEN_VEN_REQUEST", "venName": self.ven_name})
            except VtnError as exc:
                if exc.status not in (400, 403, 409):
                    raise
                log.info("OpenADR 3: no VEN object %s at the VTN and we may not create it "
                         "(%s); events targeted at %s are read", self.ven_name, exc,
                         sorted(self.names))
                self.ven_id = ""
                return
            ours = [created] if isinstance(created, Mapping) else []
        if ours:
            ven = ours[0]
            if self.ven_id != ven.get("id"):
                log.info("OpenADR 3 VEN %s is %s at %s", self.ven_name, ven.get("id"),
                         self.vtn_url)
            self.ven_id = str(ven.get("id", ""))
            self.names = frozenset({self.ven_name, *self._targets,
                                    *target_terms(ven.get("targets"))})

    async def _read_programs(self) -> tuple[dict[str, Mapping[str, Any]], list[str]]:
        found = {str(p["id"]): p for p in await self._list("/programs")
                 if isinstance(p, Mapping) and p.get("id")}
        if not self._programs:
            return found, []
        chosen = {k: p for k, p in found.items() if p.get("programName") in self._programs}
        missing = self._programs - {str(p.get("programName")) for p in chosen.values()}
        problems = [f"VTN at {self.vtn_url} has no program {', '.join(sorted(missing))} "
                    f"(it has {sorted(str(p.get('programName')) for p in found.values())})"
                    ] if missing else []
        return chosen, problems

    async def _read_events(self, programs: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        out: dict[str, Mapping[str, Any]] = {}
        scopes: list[list[tuple[str, str]]] = [[("programID", p)] for p in programs] \
            if self._programs else [[]]
        targets = [("targets", t) for t in sorted(self.names)]
        for scope in scopes:
            for params in (scope, scope + targets):
                for ev in await self._list("/events", params):
                    if isinstance(ev, Mapping) and isinstance(ev.get("id"), str):
                        out.setdefault(ev["id"], ev)
        return list(out.values())

    async def _report(self, now: float) -> None:
        if not self.events or now < self._next_report:
            return
        self._next_report = now + self._report_seconds
        try:
            watts = float(self._sheddable())
        except Exception:
            log.exception("sheddable_watts failed; this report is skipped")
            return
        for eid in list(self.events):
            body = report_body(self.raw[eid], self.ven_name, watts, now, self._report_seconds,
                               self._resource)
            rid = self.report_ids.get(eid)
            if rid and await self._call("PUT", f"/reports/{rid}", body=body,
                                        missing_ok=True) is not None:
                continue
            made = await self._call("POST", "/reports", body=body)
            if isinstance(made, Mapping) and made.get("id"):
                self.report_ids[eid] = str(made["id"])

    async def _list(self, path: str, params: list[tuple[str, str]] | None = None
                    ) -> list[Any]:
        out: list[Any] = []
        for _ in range(_MAX_PAGES):
            got = await self._call("GET", path, params=[
                *(params or []), ("skip", str(len(out))), ("limit", str(_PAGE))])
            if not isinstance(got, list):
                raise VtnError(f"answered GET {path} with {type(got).__name__}, not a list")
            out.extend(got)
            if len(got) < _PAGE:
                break
        else:
            log.warning("OpenADR 3: GET %s has more than %d pages; read the first", path,
                        _MAX_PAGES)
        return out

    async def _call(self, method: str, path: str, *, params: list[tuple[str, str]] | None = None,
                    body: Any = None, auth: bool = True, missing_ok: bool = False) -> Any:
        """One request; 401 once: a fresh token and again. None: 404 with ``missing_ok``."""
        session = self._require_session()
        for attempt in (0, 1):
            headers = {"Authorization": f"Bearer {self._token}"} if auth else {}
            try:
                async with session.request(method, self.vtn_url + path, params=params,
                                           json=body, headers=headers, ssl=self._ssl) as r:
                    if r.status == 401 and auth and attempt == 0:
                        self._token = None
                        await self._login()
                        continue
                    if r.status == 404 and missing_ok:
                        return None
                    text = await r.text()
                    if r.status not in (200, 201):
                        what = "refused our token" if r.status in (401, 403) else "answered"
                        raise VtnError(f"{what} {method} {path} with HTTP {r.status}: "
                                       f"{text[:300]}".replace("\n", " "), r.status)
                    got = _json(text)
                    if got is _NOT_JSON:
                        raise VtnError(f"answered {method} {path} with a body that is not "
                                       f"JSON: {text[:100]!r}", r.status)
                    return got
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise VtnError(f"unreachable ({method} {path}: "
                               f"{exc or type(exc).__name__})") from exc
        raise VtnError(f"refused our fresh token too ({method} {path}: HTTP 401)")

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OpenADR3Ven is not started")
        return self._session
