"""The ``clipchat`` command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from decimal import Decimal
from typing import Any

import click
import httpx
import typer
from httpx_sse import SSEError, aconnect_sse
from pydantic import ValidationError

from clipchat.retry import RetryPolicy
from clipchat.settings import Settings
from launcher.errors import StartupError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="ClipChat: change one clip of a music video by chatting.")

UrlOption = typer.Option(None, "--url", envvar="CLIPCHAT_API_URL", help="Gateway URL.")
TokenOption = typer.Option(None, "--token", envvar="CLIPCHAT_API_TOKEN", help="API token.")
TERMINAL = {"regeneration.completed", "regeneration.failed", "regeneration.cancelled"}


# Typer may vendor its own copy of click: catch argument errors from either.
_USAGE_ERRORS: tuple[type[Exception], ...] = (click.ClickException, typer.TyperException)


class CliError(Exception):
    """A mistake or failure to report as one line."""


def main() -> None:
    try:
        result = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except _USAGE_ERRORS as exc:  # wrong arguments: one line, not a usage box
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    except (CliError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the ClipChat API ({type(exc).__name__}); is it running?", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    if isinstance(result, int) and result:
        sys.exit(result)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "CLIPCHAT_" + str(first["loc"][0]).upper() if first.get("loc") else "a setting"
        raise CliError(f"invalid CLIPCHAT_* configuration: {name}: {first['msg']}") from exc
    except Exception as exc:
        raise CliError(f"invalid CLIPCHAT_* configuration: {str(exc).splitlines()[0]}") from exc


def _client(url: str | None, token: str | None, settings: Settings | None = None) -> httpx.AsyncClient:
    settings = settings or _settings()
    base = url or f"http://127.0.0.1:{settings.gateway_port}"
    token = token or next(iter(settings.token_owners()), "")
    return httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _check(response: httpx.Response, *expected: int) -> Any:
    if response.status_code not in expected:
        from launcher.demo import error_line

        raise CliError(error_line(response))
    return response.json()


def _configure_logging(settings: Settings, service: str, *, to_file: bool = False) -> None:
    from clipchat import telemetry

    telemetry.configure(service, otlp_endpoint=settings.otlp_endpoint, log_level=settings.log_level,
                        log_file=settings.data_dir / "clipchat.log" if to_file else None)


@app.command()
def up(port: int = typer.Option(None, help="Gateway port (default CLIPCHAT_GATEWAY_PORT or 8000)."),
       demo: bool = typer.Option(True, help="Create the demo job when there is no job yet.")) -> None:
    """Embedded mode: every service and the gateway on localhost, with a demo job."""
    settings = _settings()
    if port is not None:
        settings = settings.model_copy(update={"gateway_port": port})
    if not settings.page_token:
        settings = settings.model_copy(update={"page_token": next(iter(settings.token_owners()), "")})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _configure_logging(settings, "clipchat-embedded", to_file=True)
    asyncio.run(_up(settings, demo))


async def _up(settings: Settings, demo: bool) -> None:
    from launcher.system import start_embedded

    stop = _stop_event()
    print(f"Starting ClipChat (embedded: SQLite, in-process broker, storage in {settings.data_dir}/; "
          f"logs in {settings.data_dir / 'clipchat.log'})…", flush=True)
    try:
        system = await start_embedded(settings)
    except OSError as exc:
        raise CliError(f"could not start: {exc.strerror or exc}") from exc
    try:
        if demo:
            await _ensure_demo(system.url, settings)
        if system.settings.gateway_port != settings.gateway_port:
            print(f"Port {settings.gateway_port} is in use; the gateway took {system.settings.gateway_port}.",
                  flush=True)
        print(f"\nClipChat is running: {system.url}/\n"
              f"API: {system.url}/api/v1 (token: {settings.page_token})  ·  Ctrl-C to stop", flush=True)
        await stop.wait()
    finally:
        print("Stopping…", flush=True)
        await system.stop()


async def _ensure_demo(url: str, settings: Settings) -> None:
    from clipchat.media.ffmpeg import FfmpegRunner
    from launcher.demo import create_demo_job

    async with _client(url, settings.page_token, settings) as client:
        jobs = _check(await client.get("/api/v1/jobs"), 200)
        items = jobs["jobs"] if isinstance(jobs, dict) else jobs
        if items:
            return
        print("Creating the demo job (6 clips, a music track) and composing it…", flush=True)
        job = await create_demo_job(client, FfmpegRunner(settings.ffmpeg_path or None))
        job_id = job["id"]
        for _ in range(600):
            current = _check(await client.get(f"/api/v1/jobs/{job_id}"), 200)
            if current["status"] != "composing":
                print(f"Demo job {job_id}: {current['status']}", flush=True)
                return
            await asyncio.sleep(0.5)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


providers_app = typer.Typer(no_args_is_help=True, help="The configured LLM and video generator.")
app.add_typer(providers_app, name="providers")


@providers_app.command("check")
def providers_check(probe_llm: bool = typer.Option(
        False, "--probe-llm", help="Also send one small rewrite (a few tokens) to learn the LLM's "
                                   "structured-output mode.")) -> int:
    """Whether the configured LLM and video generator answer, and with what; spends nothing by default."""
    from services.regenerator.provider_check import check_providers

    settings = _settings()

    async def run() -> list[Any]:
        async with httpx.AsyncClient(timeout=settings.generator_request_timeout_seconds) as http:
            return await check_providers(settings, http=http, probe_llm=probe_llm)

    results = asyncio.run(run())
    for result in results:
        print(f"{result.part:<10} {'ok' if result.ok else 'FAILED':<7} {result.summary}")
    return 0 if all(result.ok for result in results) else 1


@app.command()
def serve(service: str = typer.Argument(..., help="status, regenerator, composer or gateway")) -> None:
    """Distributed mode: run one service, configured by CLIPCHAT_* environment variables."""
    from launcher.system import SERVICES, serve_one

    if service not in SERVICES:
        raise CliError(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")
    settings = _settings()
    _configure_logging(settings, f"clipchat-{service}")

    async def run() -> None:
        await serve_one(service, settings, _stop_event())

    if service == "gateway":
        _run_fast(run())
    else:
        asyncio.run(run())


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed (the gateway's many small HTTP and SSE writes
    cost less on it), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


@app.command()
def migrate() -> None:
    """Apply the database migrations."""
    from clipchat.db.migrate import upgrade_sync

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        upgrade_sync(settings.resolved_database_url)
    except Exception as exc:
        raise CliError(f"migration failed: {str(exc).splitlines()[0]}") from exc
    print("database is up to date")


@app.command()
def demo(url: str = UrlOption, token: str = TokenOption) -> None:
    """Create a demo job through the API."""
    from clipchat.media.ffmpeg import FfmpegRunner
    from launcher.demo import create_demo_job

    async def run() -> None:
        settings = _settings()
        async with _client(url, token, settings) as client:
            job = await create_demo_job(client, FfmpegRunner(settings.ffmpeg_path or None))
            print(f"{job['id']}  {job['status']}  {job.get('title', '')}")

    asyncio.run(run())


@app.command()
def health(url: str = UrlOption, token: str = TokenOption) -> None:
    """Show readiness: each dependency, and what the composer composes with. Exits 1 when not ready."""
    async def run() -> None:
        async with _client(url, token) as client:
            response = await client.get("/api/v1/readyz")
            data = response.json() if response.status_code in (200, 503) else _check(response, 200)
            for name, state in data["checks"].items():
                print(f"{name:<12} {state}")
            print(_composer_line(data.get("composer") or {}))
            if response.status_code != 200:
                raise CliError(data["error"]["message"])
            print("ready")

    asyncio.run(run())


def _composer_line(composer: dict[str, Any]) -> str:
    if composer.get("state") != "ok":
        return f"{'composer':<12} {composer.get('state', 'unknown')} (compositions wait in the queue)"
    cache = composer.get("cache") or {}
    return (f"{'composer':<12} ok  {composer['encoder']} ({composer['x264_preset']} preset, "
            f"{composer['workers']} workers): {composer['encoder_reason']}\n"
            f"{'':<12} segment cache: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses, "
            f"{cache.get('stores', 0)} stores, {cache.get('evictions', 0)} evictions")


@app.command()
def jobs(url: str = UrlOption, token: str = TokenOption) -> None:
    """List your jobs."""
    async def run() -> None:
        async with _client(url, token) as client:
            cursor: str | None = None
            while True:  # every page, newest first
                data = _check(await client.get("/api/v1/jobs", params={"cursor": cursor} if cursor else None), 200)
                for job in data["jobs"]:
                    print(f"{job['id']}  {job['status']:<12} v{job.get('current_version') or '-':<3} "
                          f"${job['total_cost']:<9} {job.get('title', '')}")
                cursor = data.get("next_cursor")
                if not cursor:
                    return

    asyncio.run(run())


@app.command()
def watch(job_id: str, url: str = UrlOption, token: str = TokenOption,
          after: int = typer.Option(0, help="Start after this event sequence number.")) -> None:
    """Follow a job's events."""
    async def run() -> None:
        async with _client(url, token) as client:
            _check(await client.get(f"/api/v1/jobs/{job_id}"), 200)
            async for event in sse_events(client, job_id, after):
                print(_describe(event), flush=True)

    asyncio.run(run())


@app.command()
def regenerate(job_id: str, clip: str = typer.Argument(help='A clip index (from 0), several ("1,2,3") or "all".'),
               instruction: str = typer.Argument(), url: str = UrlOption, token: str = TokenOption,
               watch: bool = typer.Option(False, "--watch", help="Follow progress until it finishes."),
               history: str = typer.Option("", help="Conversation history as a JSON list of turns.")) -> None:
    """Change one clip, several ("1,2,3") or "all" of a job by one instruction: one new version."""
    clips = _clip_selection(clip)
    body: dict[str, Any] = {"instruction": instruction}
    if history:
        try:
            body["conversation_history"] = json.loads(history)
        except ValueError:
            raise CliError("--history is not valid JSON") from None
    if isinstance(clips, int):
        path = f"/api/v1/jobs/{job_id}/clips/{clips}/regenerate"
    else:
        path, body["clips"] = f"/api/v1/jobs/{job_id}/regenerate", clips

    async def run() -> None:
        async with _client(url, token) as client:
            started = _check(await client.post(path, json=body), 202)
            regeneration_id = started["regeneration_id"]
            changed = f" of clips {', '.join(str(c['clip_index']) for c in started['clips'])}" \
                if "clips" in started else ""
            print(f"queued {regeneration_id}{changed} (estimated ${started['estimated_cost']})", flush=True)
            if started.get("budget_warning"):
                print("warning: this job is at 80 % or more of its budget", flush=True)
            if not watch:
                return
            await _follow(client, job_id, regeneration_id)

    asyncio.run(run())


@app.command()
def estimate(job_id: str, clip: str = typer.Argument(help='A clip index (from 0), several ("1,2,3") or "all".'),
             url: str = UrlOption, token: str = TokenOption) -> None:
    """Show what changing one clip, several ("1,2,3") or "all" would cost, step by step, and the budget
    left. Nothing is started or spent."""
    clips = _clip_selection(clip)
    selection = ",".join(str(c) for c in clips) if isinstance(clips, list) else str(clips)

    async def run() -> None:
        async with _client(url, token) as client:
            data = _check(await client.get(f"/api/v1/jobs/{job_id}/estimate", params={"clips": selection}), 200)
            print("\n".join(estimate_lines(data)))

    asyncio.run(run())


def _clip_selection(text: str) -> int | list[int] | str:
    """One clip index, a comma-separated list of them, or "all"."""
    if text.strip().lower() == "all":
        return "all"
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise CliError(f'clip must be a whole number, a list such as "1,2,3" or "all", not {text!r}') from None
    if any(index < 0 for index in indices):
        raise CliError("clip index must be 0 or more")
    if len(set(indices)) != len(indices):
        raise CliError("name each clip once")
    return indices[0] if len(indices) == 1 and "," not in text else indices


async def _follow(client: httpx.AsyncClient, job_id: str, regeneration_id: str) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), transient=True, disable=not sys.stdout.isatty()) as bar:
        task = bar.add_task("queued", total=1.0)
        async for event in sse_events(client, job_id, 0):
            payload = event.get("payload") or {}
            if payload.get("regeneration_id") != regeneration_id:
                continue
            if event["type"] == "progress":
                bar.update(task, completed=event.get("fraction", 0.0), description=event.get("stage", ""))
                if not sys.stdout.isatty():
                    print(f"{event.get('stage', ''):<12} {event.get('fraction', 0.0) * 100:5.1f}%", flush=True)
            if event["type"] in TERMINAL:
                bar.update(task, completed=1.0)
                break
    job = _check(await client.get(f"/api/v1/jobs/{job_id}"), 200)
    if event["type"] == "regeneration.completed":
        print(f"completed: version {job['current_version']}, cost ${payload.get('cost')}, "
              f"total ${job['total_cost']}\n{client.base_url.join(job.get('video_url', ''))}")
    elif event["type"] == "regeneration.cancelled":
        raise CliError("the regeneration was cancelled; the original video is kept")
    else:
        raise CliError(f"regeneration failed: {payload.get('message', 'unknown error')}")


# Reconnecting after a dropped stream: the project's retry policy, reset by every event received.
STREAM_RETRY = RetryPolicy(attempts=6, base_seconds=0.4, max_seconds=10.0)


async def sse_events(client: httpx.AsyncClient, job_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
    """The job's events from ``GET /events`` (httpx-sse), resuming with ``Last-Event-ID`` after a
    dropped connection; an error the gateway sends in the stream ends it with that error's message."""
    last = after
    failures = 0
    while True:
        try:
            async with aconnect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events",
                                    headers={"Last-Event-ID": str(last)},
                                    timeout=httpx.Timeout(30, read=None)) as source:
                if source.response.status_code != 200:
                    await source.response.aread()
                    _check(source.response, 200)
                async for message in source.aiter_sse():
                    if message.event == "watch.error":
                        error = message.json().get("error") or {}
                        raise CliError(error.get("message") or "the event stream failed")
                    if not message.data:
                        continue
                    last = int(message.id or last)
                    failures = 0
                    yield message.json()
        except (httpx.TransportError, SSEError) as exc:
            failures += 1
            if failures >= STREAM_RETRY.attempts:
                raise CliError(f"lost the event stream: {exc or type(exc).__name__}") from exc
            await asyncio.sleep(STREAM_RETRY.delay(failures, exc))


def _describe(event: dict[str, Any]) -> str:
    stage = event.get("stage") or ""
    fraction = event.get("fraction") or 0.0
    payload = json.dumps(event.get("payload") or {}, separators=(",", ":"))
    return f"#{event['sequence']:<5} {event['type']:<24} {stage:<12} {fraction * 100:5.1f}%  {payload}"


@app.command()
def compare(job_id: str, a: int = typer.Argument(..., min=1, help="The version compared from."),
            b: int = typer.Argument(..., min=1, help="The version compared to."),
            url: str = UrlOption, token: str = TokenOption) -> None:
    """Show which clips differ between two versions of a job, the changes between them and their cost."""
    async def run() -> None:
        async with _client(url, token) as client:
            data = _check(await client.get(f"/api/v1/jobs/{job_id}/versions/{a}/compare/{b}"), 200)
            print("\n".join(compare_lines(data)))

    asyncio.run(run())


@app.command()
def usage(job_id: str = typer.Argument(None, help="One job; all your jobs when left out."),
          url: str = UrlOption, token: str = TokenOption) -> None:
    """Show spend by step, changes by outcome and median time per stage (of one job or all yours)."""
    async def run() -> None:
        async with _client(url, token) as client:
            path = f"/api/v1/jobs/{job_id}/usage" if job_id else "/api/v1/usage"
            print("\n".join(usage_lines(_check(await client.get(path), 200))))

    asyncio.run(run())


def compare_lines(data: dict[str, Any]) -> list[str]:
    """``GET …/compare`` as a readable table: the differing clips' prompts, then the changes."""
    clips, changes = data["clips"], data["changes"]
    lines = [f"version {data['from_version']} -> {data['to_version']}: {len(clips)} clip(s) differ, "
             f"{len(changes)} change(s), cost ${data['cost']}"]
    if clips:
        lines += ["", f"{'clip':<5} {'revision':<9} prompt"]
        for clip in clips:
            revision = f"{clip['revision_before']} -> {clip['revision_after']}"
            lines.append(f"{clip['index']:<5} {revision:<9} before: {clip['prompt_before']}")
            lines.append(f"{'':<5} {'':<9} after:  {clip['prompt_after']}")
    if changes:
        lines += ["", f"{'change':<36}  {'clip':<4}  {'status':<9}  {'cost':>9}  {'version':<7}  instruction"]
        for change in changes:
            version = f"v{change['version']}" if change.get("version") else "-"
            lines.append(f"{change['id']:<36}  {change['clip_index']:<4}  {change['status']:<9}  "
                         f"{'$' + change['cost']:>9}  {version:<7}  {change['instruction']}")
    return lines


def estimate_lines(data: dict[str, Any]) -> list[str]:
    """``GET …/estimate`` as a readable table: each clip's steps, the change's estimate and the budget left."""
    steps = ("rewrite", "generate", "compose")
    lines = [f"{'clip':<5} " + " ".join(f"{step:>10}" for step in steps)]
    for clip in data["clips"]:
        costs = clip["step_costs"]
        lines.append(f"{clip['clip_index']:<5} " + " ".join(
            f"{'$' + costs[step] if step in costs else '-':>10}" for step in steps))
    lines += ["", f"estimated ${data['estimated_cost']}, budget left ${data['budget_left']}"]
    if not data["within_budget"]:
        lines.append("over budget: this change would be refused")
    elif data["budget_warning"]:
        lines.append("warning: this change would take the job near its budget")
    return lines


def usage_lines(data: dict[str, Any]) -> list[str]:
    """``GET /usage`` or ``GET /jobs/{id}/usage`` as a readable table."""
    what = f"job {data['job_id']}" if data.get("job_id") else f"your {data['jobs']} job(s)"
    steps, changes = data["spend_by_step"], data["changes"]
    lines = [f"usage of {what}: total ${data['total_cost']}"
             + (f" (+ ${data['running_cost']} by changes still running)"
                if Decimal(data["running_cost"]) else ""),
             "", f"{'step':<10} {'spend':>10}"]
    lines += [f"{step:<10} {'$' + steps[step]:>10}" for step in ("rewrite", "generate", "compose")]
    lines += ["", f"changes: {changes['completed']} completed, {changes['failed']} failed, "
                  f"{changes['cancelled']} cancelled, {changes['running']} running"]
    if data["median_seconds_by_stage"]:
        lines += ["", f"{'stage':<12} {'median':>9} {'samples':>8}"]
        lines += [f"{s['stage']:<12} {s['median_seconds']:>8.1f}s {s['samples']:>8}"
                  for s in data["median_seconds_by_stage"]]
    if data.get("median_change_seconds") is not None:
        lines.append(f"median time from request to new version: {data['median_change_seconds']:.1f}s")
    return lines


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
