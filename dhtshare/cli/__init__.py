"""The command line: click commands, terminal output, and running a node as a process."""

from __future__ import annotations
