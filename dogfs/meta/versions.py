# -*- test-case-name: tests.test_meta_versions -*-
"""Rolling upgrades of a metadata group: the log version.

Every member applies the same log, so during an upgrade, with members of two releases in one
group, the log must hold only what every member can apply. Each release says which log
version it applies (L{dogfs.meta.commands.LOG_VERSION}); the group's version is in the
replicated state (L{dogfs.meta.commands.SetLogVersion}); a command a release added (or whose
effect it changed) is proposed only once the group's version reaches the one that added it
(L{dogfs.meta.commands.since}). The leader raises the group's version, here, once every member
says it applies the higher one; a member that cannot apply an entry halts rather than diverge.
This is etcd's cluster version and Ceph's `require_osd_release`, decided without an operator.

A member answers `MetaQuery("version")` with the log version its release applies; a member of
a release before log versions does not know that query, and counts as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dogfs.meta.commands import LOG_VERSION, SetLogVersion

log = Logger()

#: Seconds between the leader's rounds (each a read of its state, and, only while the group is
#: below this release's version, a small query to each member).
CHECK_INTERVAL = 2.0


class LogVersionKeeper:
    """On the leader: raise the group's log version to the lowest one its members apply.

    :param state_version: the group's log version as this member's state holds it.
    :param members: the ids of the group's other members (voters and learners).
    :param ask: the log version a member's release applies (0 for a release before log
        versions), or a failure if it cannot be asked now.
    :param propose: proposes a command to the group, firing once it is applied.
    :param is_leader: whether this member leads (only a leader proposes).
    """

    def __init__(
        self,
        clock: Any,
        state_version: Callable[[], int],
        members: Callable[[], Sequence[str]],
        ask: Callable[[str], defer.Deferred[int]],
        propose: Callable[[Any], defer.Deferred[Any]],
        is_leader: Callable[[], bool],
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.clock = clock
        self.state_version = state_version
        self.members = members
        self.ask = ask
        self.propose = propose
        self.is_leader = is_leader
        self.interval = interval
        #: What each member said last (None: it could not be asked), for status.
        self.known: dict[str, int | None] = {}
        self._loop: LoopingCall | None = None
        self._checking = False
        # Bumped by stop: a round begun before it proposes nothing.
        self._generation = 0

    def start(self) -> None:
        """Check now and every ``interval`` seconds (while this member leads)."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        """Stop checking (this member no longer leads, or stops); a round under way proposes
        nothing."""
        self._generation += 1
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None

    def _tick(self) -> None:
        if self._checking:
            return
        self._checking = True
        d = defer.Deferred.fromCoroutine(self.check())
        d.addErrback(lambda f: log.failure("raising the metadata log version failed; trying again later", f))

        def done(_: object) -> None:
            self._checking = False

        d.addBoth(done)

    async def check(self) -> int | None:
        """One round: ask every other member; if all answered and the lowest version they
        and this member apply is above the group's, propose it. Fires with the version
        proposed, or None."""
        generation = self._generation
        if not self.is_leader() or self.state_version() >= LOG_VERSION:
            return None  # nothing higher that this member could apply
        members = sorted(self.members())
        answers = await defer.gatherResults(
            [self.ask(member).addErrback(lambda f: None) for member in members], consumeErrors=True
        )
        self.known = dict(zip(members, answers, strict=True))
        versions = [a for a in answers if a is not None]
        if len(versions) < len(answers):
            return None  # a member's release is unknown: it might apply less
        if generation != self._generation or not self.is_leader() or sorted(self.members()) != members:
            return None  # stopped, deposed, or the membership changed meanwhile: ask again
        target = min([LOG_VERSION, *versions])
        group = self.state_version()
        if target <= group:
            return None
        log.info(
            "every metadata member applies log version {target}: raising the group's from {group}",
            target=target, group=group,
        )
        await self.propose(SetLogVersion(target))
        return target
