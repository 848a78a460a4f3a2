"""The ``dhtshare`` command: click declarations and output formatting only.

Every command that needs the running node sends one request over the control socket
(``control.call``); the node does the work. Errors are one line on stderr and a non-zero exit.
The node's reply is read through ``replies.Reply`` (typed fields; a malformed reply is one
``error:`` line), and every string in it is printed through ``display.clean``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from dhtshare.cli import hints
from dhtshare.cli.display import LOG_FORMAT, CleanFormatter, ProgressLine
from dhtshare.cli.interrupt import Interrupted, get_or_interrupt
from dhtshare.cli.replies import Reply, malformed, rows
from dhtshare.errors import DhtshareError, IdentityError, NodeError
from dhtshare.home import Home
from dhtshare.identity import Identity, describe_key_file
from dhtshare.node import control, settings
from dhtshare.text import clean, fields, format_rate, format_size, plural, table, table_with_notes

__all__ = ["main"]

STOP_TIMEOUT = 30.0
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def default_home() -> Path:
    """The platform's user data directory (XDG on Linux, Application Support on macOS)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "dhtshare"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dhtshare"


def fail(message: str, hint: str = "", code: int = 1) -> NoReturn:
    """One ``error:`` line and a ``hint:`` line on stderr (both cleaned: they may quote
    remote text), then exit with ``code``."""
    click.secho(f"error: {clean(message)}", fg="red", err=True)
    if hint:
        click.echo(f"hint: {clean(hint)}", err=True)
    sys.exit(code)


def write_crash_log(home: Home | None) -> Path | None:
    """Append the current traceback to ``home.crash_log`` (0600, no symbolic link
    followed) if ``home`` is a directory of ours, else to a new private temp file
    (``mkstemp``: ``O_EXCL``, 0600); never to a fixed name in a shared directory.
    Returns where it went, or ``None`` if it could not be written."""
    text = traceback.format_exc().encode("utf-8", "backslashreplace")
    try:
        if home is not None and _is_own_dir(home.root):
            path = home.crash_log
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                os.close(fd)
                raise OSError(f"{path} is not a file of ours")
        else:
            fd, name = tempfile.mkstemp(prefix="dhtshare-crash-", suffix=".log")
            path = Path(name)
        with os.fdopen(fd, "ab") as fh:
            fh.write(text)
    except OSError:
        return None
    return path


def _is_own_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


class Cli(click.Group):
    """Maps every failure to one line on stderr; a traceback goes only to a log file."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Like click's, but a usage error is one ``error:`` line and a hint, exit 2."""
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "dhtshare"
            hint = with_home(exc.ctx, f"see: {where} --help")
            fail(exc.format_message().replace("\n", " "), hint, code=2)
        except click.ClickException as exc:
            fail(exc.format_message().replace("\n", " "), code=exc.exit_code)
        except click.exceptions.Abort:
            fail("interrupted", code=130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DhtshareError as exc:
            fail(with_home(ctx, exc.message), with_home(ctx, exc.hint))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:
            home = None
            with contextlib.suppress(Exception):
                home = home_of(ctx)
            log = write_crash_log(home)
            where = f"details in {log}" if log else "no details could be saved"
            fail(f"unexpected failure: {exc}", f"{where}; please report it", code=2)


def home_of(ctx: click.Context) -> Home:
    """The state directory: ``--home`` (or ``DHTSHARE_HOME``), else ``default_home()``."""
    return Home(Path(ctx.find_root().params["home"] or default_home()).expanduser())


def with_home(ctx: click.Context | None, text: str) -> str:
    """``text`` with the user's ``--home`` (or ``DHTSHARE_HOME``) in every command it
    names (``hints.with_home``): copying a hint acts on the same node."""
    if ctx is None:
        return text
    root = ctx.find_root()
    home = root.params.get("home")
    commands = {  # a group that runs without a subcommand counts as a plain command
        name: [] if getattr(command, "invoke_without_command", False) else list(subs)
        for name, command in getattr(root.command, "commands", {}).items()
        for subs in [getattr(command, "commands", {})]
    }
    return hints.with_home(text, str(Path(home).expanduser()) if home else None, commands)


def node_call(
    ctx: click.Context,
    cmd: str,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    **args: Any,
) -> Any:
    return asyncio.run(control.call(control.socket_path(home_of(ctx)), cmd, args, on_progress))


def emit(ctx: click.Context, doc: Any, render: Callable[[Any], str]) -> None:
    """Print ``doc`` as JSON when --json was given, otherwise as ``render`` shows it.

    ``render`` reads ``doc`` through ``replies``, so a malformed reply is an error either
    way. The JSON is ASCII with every control character escaped: safe on a terminal."""
    text = render(doc)
    if ctx.params.get("as_json"):
        click.echo(json.dumps(doc, indent=2, ensure_ascii=True, allow_nan=False))
    else:
        click.echo(text)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def read_passphrase(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise IdentityError(
            f"cannot read passphrase file {path}: {exc.strerror}", "check the path"
        ) from exc
    if not secret:
        raise IdentityError(f"passphrase file {path} is empty", "put the passphrase in it")
    return secret


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@click.group(cls=Cli, context_settings=CONTEXT)
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="DHTSHARE_HOME",
    help="State directory (identity, groups, shares). Default: the user data directory.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log more to stderr.")
@click.version_option(package_name="dhtshare")
def main(home: str | None, verbose: bool) -> None:
    """Share files with your groups: parallel, verified downloads, no central server.

    \b
    Example:
      dhtshare id create --name alice
      dhtshare node start --bootstrap 203.0.113.7:4000 --detach
      dhtshare group create climbers
    """
    handler = logging.StreamHandler()
    handler.setFormatter(CleanFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


# ----------------------------------------------------------------------------- identity


@main.group("id", context_settings=CONTEXT)
def identity_group() -> None:
    """Your identity: an ed25519 key that signs everything you publish."""


@identity_group.command("create", context_settings=CONTEXT)
@click.option("--name", default="", help="Display name others see.")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False),
    help="Protect the key with this passphrase.",
)
@click.pass_context
def id_create(ctx: click.Context, name: str, passphrase_file: str | None) -> None:
    """Create your identity and print its id.

    Example: dhtshare id create --name alice
    """
    path = home_of(ctx).identity
    if path.exists():
        raise IdentityError(
            f"an identity already exists at {path}", "use another --home, or dhtshare id show"
        )
    me = Identity.generate(name)
    me.save(path, read_passphrase(passphrase_file))
    click.echo(me.id)


@identity_group.command("show", context_settings=CONTEXT)
@json_option
@click.pass_context
def id_show(ctx: click.Context, as_json: bool) -> None:
    """Show your id, name and fingerprint.

    Example: dhtshare id show
    """
    info = describe_key_file(home_of(ctx).identity)
    emit(ctx, info, status_fields)


# --------------------------------------------------------------------------------- node

bootstrap_option = click.option(
    "--bootstrap",
    "bootstraps",
    multiple=True,
    metavar="HOST:PORT",
    help="A node to join the network through (repeatable).",
)


@main.group(context_settings=CONTEXT)
def node() -> None:
    """Run, stop and inspect your node."""


@node.command("start", context_settings=CONTEXT)
@click.option(
    "--host",
    default="0.0.0.0",
    show_default=True,
    help="Address to listen on (default: every interface).",
)
@click.option(
    "--port",
    default=0,
    type=click.IntRange(0, 65535),
    help="UDP (DHT) and TCP (peers) port; 0: the last run's port if free, else any.",
)
@bootstrap_option
@click.option("--detach", is_flag=True, help="Return once the node is up and bootstrapped.")
@click.option(
    "--passphrase-file", type=click.Path(dir_okay=False), help="Passphrase of a protected identity."
)
@click.option(
    "--advertise",
    metavar="HOST",
    help="Address peers should connect to. Default: --host, or for every interface the"
    " local address toward the bootstrap node.",
)
@click.option(
    "--upload-limit",
    type=click.FloatRange(min=0),
    metavar="MB/S",
    help="Cap on all uploads together, in MB/s (0: no limit). Kept for later starts.",
)
@click.option(
    "--download-limit",
    type=click.FloatRange(min=0),
    metavar="MB/S",
    help="Cap on all downloads together, in MB/s (0: no limit). Kept for later starts.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="What DIR/node.log keeps (default info). Kept for later starts.",
)
@click.option(
    "--no-relay",
    is_flag=True,
    help="Do not relay for private nodes (a node found public relays by default).",
)
@click.option("--ready-fd", type=int, hidden=True)
@click.option(
    "--provider-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    envvar="DHTSHARE_PROVIDER_TIMEOUT",
    hidden=True,
    help="Seconds a download waits for anybody to serve it before failing.",
)
@click.pass_context
def node_start(
    ctx: click.Context,
    host: str,
    port: int,
    bootstraps: tuple[str, ...],
    detach: bool,
    passphrase_file: str | None,
    ready_fd: int | None,
    provider_timeout: float,
    advertise: str | None,
    upload_limit: float | None,
    download_limit: float | None,
    log_level: str | None,
    no_relay: bool,
) -> None:
    """Start your node: DHT on UDP and the peer server on TCP, both on PORT, on every
    interface. Rate limits and the log level not given are those of the last start.

    Example: dhtshare node start --port 4001 --bootstrap 203.0.113.7:4000 --detach
    """
    # lazy: the running node (kademlia, transfer) loads only for the commands that run one
    from dhtshare.cli.daemon import NodeConfig, run_detached, run_foreground

    home = home_of(ctx)
    kept = settings.merge(
        settings.load(home),
        upload_limit=None if upload_limit is None else upload_limit * 1e6,
        download_limit=None if download_limit is None else download_limit * 1e6,
        log_level=log_level,
        bootstrap=tuple(parse_hostport(b) for b in bootstraps),
    )
    config = NodeConfig(
        home=home.root,
        host=host,
        port=port,
        bootstrap=kept["bootstrap"],
        passphrase=read_passphrase(passphrase_file),
        provider_timeout=provider_timeout,
        advertise=advertise,
        upload_limit=kept["upload_limit"],
        download_limit=kept["download_limit"],
        log_level=kept["log_level"],
        relay=not no_relay,
    )
    if detach:
        verbose = bool(ctx.find_root().params.get("verbose"))
        info = Reply(run_detached(config, sys.argv[0], passphrase_file, verbose), "node start")
        host, port, pid = info.text("host"), info.integer("port"), info.integer("pid")
        where = info.text("advertised", f"{host}:{port}")
        click.echo(f"node running at {clean(where)} (pid {pid}), listening on {clean(host)}")
        if info.integer("dht_contacts", 1) == 0:
            warn_alone(ctx, where)
        return
    run_foreground(config, ready_fd)


def warn_alone(ctx: click.Context, where: str) -> None:
    """The node knows no other node: say so now, not at the first failing command."""
    click.secho(
        "warning: not connected to any node (no --bootstrap given, and no saved contact"
        " answered); publishing fails until one is",
        fg="yellow",
        err=True,
    )
    hint = (
        f"others can join through this node with --bootstrap {where}; to join a network:"
        " dhtshare node stop, then dhtshare node start --bootstrap HOST:PORT --detach"
    )
    click.echo(f"hint: {clean(with_home(ctx, hint))}", err=True)


@node.command("stop", context_settings=CONTEXT)
@click.pass_context
def node_stop(ctx: click.Context) -> None:
    """Stop your node; all sharing stops until it starts again.

    Example: dhtshare node stop
    """
    pid = Reply(node_call(ctx, "stop"), "node stop").integer("pid", 0)
    if not wait_exit(pid, STOP_TIMEOUT):
        raise NodeError(
            f"the node (pid {pid}) is still stopping after {STOP_TIMEOUT:g} s",
            "check it with: dhtshare node status",
        )
    click.echo("node stopped")


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited (or is a zombie); False on timeout."""
    deadline = time.monotonic() + timeout
    while pid > 0 and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                if fh.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        except OSError:
            pass  # no /proc (macOS): rely on kill alone
        time.sleep(0.05)
    return pid <= 0


@node.command("status", context_settings=CONTEXT)
@json_option
@click.pass_context
def node_status(ctx: click.Context, as_json: bool) -> None:
    """Address, DHT contacts, groups, shares and transfers of your node.

    Example: dhtshare node status --json
    """
    emit(ctx, node_call(ctx, "status"), status_fields)


def status_fields(doc: Any) -> str:
    """An object's scalar fields as ``key  value`` lines (a nested value: its size)."""
    reply = Reply(doc, "status")
    shown = {
        k: v if v is None or isinstance(v, str | int | float | bool) else f"({len(v)} entries)"
        for k, v in reply.doc.items()
    }
    if "public_address" in shown and shown["public_address"] is None:
        shown["public_address"] = "not known yet"
    relays = reply.doc.get("relays")
    if isinstance(relays, list):
        shown["relays"] = ", ".join(str(r) for r in relays) or "none"
    return fields(shown)


# -------------------------------------------------------------------------------- groups


@main.group(context_settings=CONTEXT)
def group() -> None:
    """Create, join and manage groups."""


@group.command("create", context_settings=CONTEXT)
@click.argument("name")
@click.option(
    "--public", is_flag=True, help="List the group, with its invite, in the public directory."
)
@json_option
@click.pass_context
def group_create(ctx: click.Context, name: str, public: bool, as_json: bool) -> None:
    """Create a group you own; prints its invite (give it to the people who should join),
    then its id.

    Example: dhtshare group create climbers
    """

    def render(doc: Any) -> str:
        result = Reply(doc, "group create")
        return f"{clean(result.text('invite'))}\ngroup id: {clean(result.text('group_id'))}"

    doc = node_call(ctx, "group.create", name=name, public=public)
    if as_json:
        reply = Reply(doc, "group create")
        doc = {"group_id": reply.text("group_id"), "invite": reply.text("invite")}
    emit(ctx, doc, render)


@group.command("invite", context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@click.option("--rotate", is_flag=True, help="Replace the invite: the old one stops working.")
@click.pass_context
def group_invite(ctx: click.Context, group_ref: str, rotate: bool) -> None:
    """Print the group's invite (owner only).

    Example: dhtshare group invite climbers --rotate
    """
    doc = node_call(ctx, "group.invite", group=group_ref, rotate=rotate)
    click.echo(clean(Reply(doc, "group invite").text("invite")))


@group.command("join", context_settings=CONTEXT)
@click.argument("group_ref", metavar="INVITE")
@click.option("--message", default="", help="A note for the owner.")
@click.pass_context
def group_join(ctx: click.Context, group_ref: str, message: str) -> None:
    """Ask to join a group by the invite its owner gave you (or a public group's name).

    Example: dhtshare group join AXk3...Qw --message "hi, it's alice"
    """
    result = Reply(node_call(ctx, "group.join", group=group_ref, message=message), "group join")
    click.echo(f"join request sent; status: {clean(result.text('status'))}")


@group.command("leave", context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@click.pass_context
def group_leave(ctx: click.Context, group_ref: str) -> None:
    """Leave a group (or cancel your request to join it); your shares in it stop.

    An owner hands the group to its longest-standing member.

    Example: dhtshare group leave climbers
    """
    done = Reply(node_call(ctx, "group.leave", group=group_ref), "group leave")
    if done.text("outcome", "left") == "cancelled":
        click.echo("cancelled your request to join")
    else:
        heir = done.text("new_owner_name", "") or done.text("new_owner", "")[:12]
        if heir:
            click.echo(
                f"left the group; new owner {clean(heir)} (your invite stops working:"
                " the new owner gives out its own with: dhtshare group invite GROUP)"
            )
        else:
            click.echo("left the group")
    echo_stopped(done)


def echo_stopped(done: Reply) -> None:
    """Say which shares a leave or forget stopped."""
    names = done.doc.get("stopped_shares") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise malformed(done.what, "field 'stopped_shares' is not a list of text")
    names = [clean(n) for n in names]
    if names:
        files = "file" if len(names) == 1 else "files"
        click.echo(f"stopped sharing {len(names)} {files}: {', '.join(names)}")


@group.command("forget", context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@click.pass_context
def group_forget(ctx: click.Context, group_ref: str) -> None:
    """Drop a group or request from your list without telling anyone; your shares in it stop.

    For a group that no longer exists, or a request you no longer care about. A group
    you own must be left instead (that hands it on).

    Example: dhtshare group forget 3f2a91c0e1b2
    """
    done = Reply(node_call(ctx, "group.forget", group=group_ref), "group forget")
    click.echo(f"forgot {clean(done.text('name', '') or done.text('group_id')[:12])}")
    echo_stopped(done)


@group.command("requests", context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@json_option
@click.pass_context
def group_requests(ctx: click.Context, group_ref: str, as_json: bool) -> None:
    """Pending join requests (owner only).

    Example: dhtshare group requests climbers
    """

    def render(doc: Any) -> str:
        rs = rows(doc, "group requests")
        if not rs:
            return "no pending requests"
        return table(
            [(r.text("name"), r.text("id"), r.text("time"), r.text("message")) for r in rs],
            ["NAME", "ID", "REQUESTED", "MESSAGE"],
        )

    emit(ctx, node_call(ctx, "group.requests", group=group_ref), render)


def _decide(cmd: str, verb: str) -> Callable[..., None]:
    @click.argument("group_ref", metavar="GROUP")
    @click.argument("member")
    @click.pass_context
    def decide(ctx: click.Context, /, group_ref: str, member: str, **extra: Any) -> None:
        result = Reply(node_call(ctx, cmd, group=group_ref, member=member, **extra), cmd)
        click.echo(f"{verb} {clean(result.text('name', '') or result.text('id'))}")

    return decide


group.command(
    "accept",
    context_settings=CONTEXT,
    help="Accept a join request (owner only).\n\nExample: dhtshare group accept climbers alice",
)(_decide("group.accept", "accepted"))
group.command(
    "reject",
    context_settings=CONTEXT,
    help="Reject a join request (owner only); the requester sees it.\n\n"
    "Example: dhtshare group reject climbers mallory",
)(
    click.option("--reason", default="", help="Shown to the requester.")(
        _decide("group.reject", "rejected")
    )
)
group.command(
    "remove",
    context_settings=CONTEXT,
    help="Remove a member (owner only).\n\nExample: dhtshare group remove climbers bob",
)(_decide("group.remove", "removed"))


@group.command("list", context_settings=CONTEXT)
@click.option("--directory", is_flag=True, help="Groups in the public directory instead of yours.")
@json_option
@click.pass_context
def group_list(ctx: click.Context, directory: bool, as_json: bool) -> None:
    """Your groups and your role in each, or the public directory.

    Example: dhtshare group list --directory
    """

    def render(doc: Any) -> str:
        rs = rows(doc, "group list")
        if not rs:
            return "no groups"
        return table(
            [
                (r.text("name"), r.text("group_id"), r.text("role", ""), r.integer("members"))
                for r in rs
            ],
            ["NAME", "GROUP", "ROLE", "MEMBERS"],
        )

    emit(ctx, node_call(ctx, "group.list", directory=directory), render)


@group.command("members", context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@json_option
@click.pass_context
def group_members(ctx: click.Context, group_ref: str, as_json: bool) -> None:
    """Members of a group, with their join times.

    Example: dhtshare group members climbers
    """

    def render(doc: Any) -> str:
        return table(
            [
                (r.text("name"), r.text("id"), r.text("role"), r.text("since"))
                for r in rows(doc, "group members")
            ],
            ["NAME", "ID", "ROLE", "SINCE"],
        )

    emit(ctx, node_call(ctx, "group.members", group=group_ref), render)


# --------------------------------------------------------------------------------- files


@main.command(context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@click.argument("path", type=click.Path(dir_okay=False))
@click.pass_context
def share(ctx: click.Context, group_ref: str, path: str) -> None:
    """Share a file with a group; prints its content id.

    Example: dhtshare share climbers ~/videos/route.mp4
    """
    bar = ProgressLine("hashing", 1)

    def progress(doc: Any) -> None:
        p = Reply(doc, "share (progress)")
        bar.total = max(p.integer("total", 1), 1)
        bar.update(p.integer("done", 0))

    try:
        result = node_call(
            ctx, "share", progress, group=group_ref, path=str(Path(path).expanduser().resolve())
        )
    finally:
        bar.finish()
    click.echo(clean(Reply(result, "share").text("content_id")))


@main.command(context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@json_option
@click.pass_context
def files(ctx: click.Context, group_ref: str, as_json: bool) -> None:
    """Files shared in a group.

    Example: dhtshare files climbers
    """

    def render(doc: Any) -> str:
        rs = rows(doc, "files")
        if not rs:
            return "no files"
        return table(
            [
                (
                    r.text("name"),
                    format_size(r.integer("size")),
                    r.text("content_id")[:16],
                    r.text("sharer_name", "") or r.text("sharer")[:12],
                    r.integer("providers"),
                    r.integer("online", 0),
                )
                for r in rs
            ],
            ["NAME", "SIZE", "CONTENT", "SHARER", "PROVIDERS", "ONLINE"],
        )

    emit(ctx, node_call(ctx, "files", group=group_ref), render)


@main.command(context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@click.argument("file_ref", metavar="FILE")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Directory to save into.",
)
@click.option("--no-wait", is_flag=True, help="Start the download and return.")
@click.pass_context
def get(ctx: click.Context, group_ref: str, file_ref: str, out: str, no_wait: bool) -> None:
    """Download a file from a group, in parallel from many peers, verifying every piece.

    Ctrl-C asks whether to keep downloading in the background or cancel (it cancels
    when stdin is not a terminal).

    Example: dhtshare get climbers route.mp4 --out ~/Downloads
    """
    args: dict[str, Any] = {
        "group": group_ref,
        "file": file_ref,
        "out": str(Path(out).expanduser().resolve()),
        "wait": not no_wait,
    }
    if no_wait:
        started = Reply(node_call(ctx, "get", **args), "get")
        click.echo(f"downloading {clean(started.text('name'))} into {clean(started.text('path'))}")
        return
    bar = ProgressLine("downloading", 1)

    def progress(doc: Any) -> None:
        p = Reply(doc, "get (progress)")
        bar.total = max(p.integer("size", 1), 1)
        relayed = p.integer("relayed", 0)
        bar.update(
            p.integer("bytes_done", 0),
            f"{format_rate(p.number('rate', 0.0))} from {plural(p.integer('peers', 0), 'peer')}"
            + (f" ({relayed} relayed)" if relayed else ""),
        )

    def keep(name: str) -> bool:
        bar.finish()
        if not sys.stdin.isatty():
            return False
        question = f"keep downloading {clean(name)} in the background? (no: cancel it)"
        return click.confirm(question, default=False, err=True)

    path = control.socket_path(home_of(ctx))
    try:
        result = asyncio.run(get_or_interrupt(path, args, progress, keep))
    finally:
        bar.finish()
    if isinstance(result, Interrupted):
        if result.kept:
            fail(
                f"interrupted: {result.name} goes on downloading in the background",
                with_home(ctx, "watch it with: dhtshare downloads"),
                code=130,
            )
        fail(f"interrupted: the download of {result.name} was cancelled", code=130)
    done = Reply(result, "get")
    size = format_size(done.integer("size"))
    click.echo(f"{clean(done.text('path'))}: complete and verified ({size})")


@main.group(context_settings=CONTEXT, invoke_without_command=True)
@json_option
@click.pass_context
def downloads(ctx: click.Context, as_json: bool) -> None:
    """Downloads in progress and done (with a failed one's error); cancel or clear them.

    Example: dhtshare downloads --json
    """
    if ctx.invoked_subcommand is None:
        emit(ctx, node_call(ctx, "downloads"), downloads_table)


def downloads_table(doc: Any) -> str:
    """One row per download; a failed one is followed by its error and hint."""
    rs = rows(doc, "downloads")
    if not rs:
        return "no downloads"
    cells = [
        (
            r.text("name"),
            r.text("group", "") or r.text("group_id", "")[:16],
            r.text("state"),
            f"{min(100, 100 * r.integer('bytes_done') // max(r.integer('size'), 1))}%",
            format_size(r.integer("size")),
            r.count("sources"),
            r.text("path"),
        )
        for r in rs
    ]
    notes = [
        [f"error: {r.text('error', '')}", f"hint: {r.text('hint', '')}"]
        if r.text("state") == "failed"
        else []
        for r in rs
    ]
    headers = ["NAME", "GROUP", "STATE", "DONE", "SIZE", "PEERS", "PATH"]
    return table_with_notes(cells, headers, notes)


@downloads.command("cancel", context_settings=CONTEXT)
@click.argument("file_ref", metavar="FILE")
@click.pass_context
def downloads_cancel(ctx: click.Context, file_ref: str) -> None:
    """Cancel a download and delete its partial file (FILE: its name or content id).

    A cancelled download is not resumed when the node starts again.

    Example: dhtshare downloads cancel route.mp4
    """
    done = Reply(node_call(ctx, "downloads.cancel", file=file_ref), "downloads cancel")
    click.echo(f"cancelled {clean(done.text('name'))}")


@downloads.command("clear", context_settings=CONTEXT)
@click.pass_context
def downloads_clear(ctx: click.Context) -> None:
    """Forget complete and failed downloads (their files stay where they are).

    Example: dhtshare downloads clear
    """
    gone = rows(node_call(ctx, "downloads.clear"), "downloads clear")
    click.echo(f"cleared {len(gone)} download{'' if len(gone) == 1 else 's'}")


@main.command(context_settings=CONTEXT)
@click.argument("group_ref", metavar="GROUP")
@click.argument("file_ref", metavar="FILE")
@click.pass_context
def unshare(ctx: click.Context, group_ref: str, file_ref: str) -> None:
    """Stop sharing a file.

    Example: dhtshare unshare climbers route.mp4
    """
    result = Reply(node_call(ctx, "unshare", group=group_ref, file=file_ref), "unshare")
    click.echo(f"stopped sharing {clean(result.text('name'))}")


@main.command(context_settings=CONTEXT)
@click.argument("group_ref", metavar="[GROUP]", required=False)
@json_option
@click.pass_context
def shares(ctx: click.Context, group_ref: str | None, as_json: bool) -> None:
    """Files your node shares (in GROUP, or in all your groups): how many peers it served
    each one to, and how much of it it uploaded.

    Example: dhtshare shares climbers
    """

    def render(doc: Any) -> str:
        rs = rows(doc, "shares")
        if not rs:
            return "no shares"
        return table(
            [
                (
                    r.text("name"),
                    r.text("group", "") or r.text("group_id")[:16],
                    format_size(r.integer("size")),
                    r.text("content_id")[:16],
                    r.integer("peers"),
                    format_size(r.integer("uploaded")),
                )
                for r in rs
            ],
            ["NAME", "GROUP", "SIZE", "CONTENT", "PEERS", "UPLOADED"],
        )

    emit(ctx, node_call(ctx, "shares", group=group_ref), render)


# ------------------------------------------------------------------------ network tools


@main.command(context_settings=CONTEXT)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=4000, show_default=True, type=click.IntRange(1, 65535), help="UDP port."
)
@click.option(
    "--state", type=click.Path(file_okay=False), help="Where to keep the node id and routing table."
)
@bootstrap_option
@click.option(
    "--relay",
    is_flag=True,
    help="Also relay for private nodes (listens on TCP too, on the same port number).",
)
@click.option(
    "--advertise",
    metavar="IP",
    help="The public address of this server, if it is not on its interface (a cloud"
    " server's 1:1 NAT); relays accept reservations naming it.",
)
@click.pass_context
def bootstrap(
    ctx: click.Context,
    host: str,
    port: int,
    state: str | None,
    bootstraps: tuple[str, ...],
    relay: bool,
    advertise: str | None,
) -> None:
    """Run a DHT-only bootstrap node in the foreground (for a server).

    Example: dhtshare bootstrap --port 4000 --state /var/lib/dhtshare --relay
    """
    from dhtshare.cli.daemon import run_bootstrap  # lazy: as in node start

    run_bootstrap(
        Home(Path(state).expanduser()) if state else home_of(ctx),
        host,
        port,
        tuple(parse_hostport(b) for b in bootstraps),
        relay=relay,
        advertise=advertise,
    )


@main.command(context_settings=CONTEXT)
@click.argument("address", metavar="HOST:PORT")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for an answer.")
def ping(address: str, timeout: float) -> None:
    """Check that a dhtshare node answers at HOST:PORT (exit 0) or not (exit 1).

    Example: dhtshare ping 203.0.113.7:4000
    """
    from dhtshare.cli.daemon import ping_node  # lazy: as in node start

    host, port = parse_hostport(address)
    rtt = asyncio.run(ping_node(host, port, timeout))
    if rtt is None:
        raise NodeError(
            f"no answer from {host}:{port} within {timeout:g} s",
            "is the node running and the UDP port open?",
        )
    click.echo(f"{host}:{port} answered in {rtt * 1000:.1f} ms")


@main.command(context_settings=CONTEXT)
@click.option("--nodes", type=click.IntRange(2, 20000), help="Nodes in the network (default 30).")
@click.option(
    "--size",
    help="File size in MiB, or with K, M or G (512K, 1G); 0 runs the DHT only (default 64).",
)
@click.option(
    "--seeders", type=click.IntRange(0, 1000), help="Members sharing the file (default 3)."
)
@click.option(
    "--downloaders", type=click.IntRange(0, 1000), help="Members downloading it (default 3)."
)
@click.option(
    "--churn", type=click.FloatRange(0, 0.95), help="Fraction of nodes stopped during the run."
)
@click.option("--seed", type=int, help="Random seed: the same seed runs the same scenario.")
@click.option(
    "--scenario", type=click.Path(dir_okay=False, exists=True), help="A scenario file (JSON)."
)
@click.option("--procs", type=click.IntRange(1, 64), help="Worker processes for DHT-only nodes.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Write throughput and latency plots to this PNG.",
)
@json_option
@click.pass_context
def simulate(
    ctx: click.Context, /, as_json: bool, plot: str | None, scenario: str | None, **options: Any
) -> None:
    """Run a real multi-node network on this machine and report how it did.

    \b
    Example:
      dhtshare simulate
      dhtshare simulate --nodes 1000 --size 0 --churn 0.2 --procs 2 --json
    """
    from dhtshare.sim.runner import run_simulation  # lazy: the simulator loads only to run

    ok = run_simulation(
        scenario, {k: v for k, v in options.items() if v is not None}, as_json, plot
    )
    sys.exit(0 if ok else 1)
