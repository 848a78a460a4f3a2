"""Commands named in hints carry the state directory the user chose.

A hint such as ``start one with: dhtshare node start --detach`` is meant to be copied. A
user who runs several nodes on one machine gives each its own ``--home`` (or
``DHTSHARE_HOME``); a hint without it would act on the default node instead. Errors and
hints come from everywhere (the CLI, the control socket, the node), so they are not
written with the directory in them: the CLI passes every hint it prints through
``with_home``, the one place that adds it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

__all__ = ["with_home"]


def with_home(text: str, home: str | None, commands: Mapping[str, Iterable[str]]) -> str:
    """``text`` with ``--home HOME`` after every ``dhtshare`` that starts a command line:
    ``dhtshare node start`` becomes ``dhtshare --home /x node start``. ``commands`` maps
    each top-level command to its subcommands (none for a plain command); a group counts
    only when a subcommand or an option follows, so prose such as ``the dhtshare node is
    up`` is left alone. Unchanged when ``home`` is ``None`` or empty."""
    if not home:
        return text
    forms = []
    for name, subs in sorted(commands.items(), key=lambda kv: len(kv[0]), reverse=True):
        subs = sorted(subs, key=len, reverse=True)
        if subs:
            alts = "|".join(re.escape(s) for s in subs)
            forms.append(rf"{re.escape(name)} (?:(?:{alts})\b|-)")
        else:
            forms.append(rf"{re.escape(name)}\b")
    pattern = re.compile(rf"\bdhtshare(?= (?:{'|'.join(forms)}))")
    return pattern.sub(lambda _m: f"dhtshare --home {shlex.quote(home)}", text)
