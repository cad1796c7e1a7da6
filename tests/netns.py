# -*- test-case-name: tests.test_jepsen_partition -*-
"""Network namespaces for partition tests: each node in its own namespace, links we can cut.

The layout, for nodes 1..N of one test run (TAG is unique per run: the test's pid and a
counter; S a /24 nothing on the machine uses yet):

    root namespace:  bridge dgjTAGbr, 10.77.S.1/24; a veth dgjTAGr<i> per node enslaved to it,
                     with the bridge's port isolation on, so nodes never talk to each other
                     through the bridge; only the root namespace (clients, chunk servers)
                     reaches them that way.
    namespace dogfs-jepsen-TAG-<i>:  lo; up0 (the peer of dgjTAGr<i>), 10.77.S.(10+i)/24: the
                     node's address; a veth p<j> to every other node j (the peer of p<i> in
                     namespace j), with a /32 route for 10.77.S.(10+j) through it.

So node i reaches node j only over its p<j> link: cutting a link is `ip link set p<j> down` on
both ends (which also drops the /32 route: traffic to j then falls back to the bridge's /24,
whose isolated ports drop it, as a real partition would: silently, after ARP gives up). Healing
sets both ends up and puts the route back. Silencing a node also sets its dgjTAGr<i> down: then
not even the root namespace reaches it. Only the private 10.77.S.0/24 addresses are used, and
no namespace has a route through another (a node's only routes are its /32s and the bridge's
on-link /24), so nothing is forwarded around a cut whatever the root's ip_forward says.

This is Jepsen's partition nemesis, with links instead of iptables rules (this machine has no
nft or iptables): any graph of who-sees-whom among the nodes is a set of cut links.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence

__all__ = ["NetnsTopology", "netns_unavailable", "sweep_stale"]

PREFIX = "dgj"
NS_MARK = "dogfs-jepsen-"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why network-namespace partitions cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return f"network namespaces need root (this test runs as uid {os.geteuid()})"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command (iproute2) is not installed"
    probe = f"{NS_MARK}probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process in ``namespace``: left there, one would keep it alive after
    `ip netns del` (only our test's daemons run in these namespaces)."""
    for inside in _run("ip", "netns", "pids", namespace, check=False).stdout.split():
        try:
            os.kill(int(inside), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def sweep_stale() -> list[str]:
    """Delete the namespaces (and the processes in them) and bridges an earlier run left
    behind because it was killed (its process is gone).

    Names carry the creating process's pid, so a concurrent run is never touched.
    """
    removed = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(NS_MARK):
            continue
        try:
            pid = int(name[len(NS_MARK):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            _kill_inside(name)
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    for line in _run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) and name.endswith("br"):
            tag_pid = name[len(PREFIX):-2]
            try:
                pid = int(tag_pid.split("x")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                _run("ip", "link", "del", name, check=False)
                removed.append(name)
    return removed


def _free_subnet() -> int:
    """A third octet S such that nothing on this machine routes or owns 10.77.S.0/24."""
    used = _run("ip", "-4", "-o", "addr", "show").stdout + _run("ip", "-4", "route", "show", "table", "all").stdout
    start = os.getpid() % 200 + 20
    for k in range(250):
        s = (start + k) % 250 + 1
        if f"10.77.{s}." not in used:
            return s
    raise RuntimeError("no free 10.77.S.0/24 subnet")


class NetnsTopology:
    """N namespaces meshed by veth pairs, plus a bridge to the root namespace (see above)."""

    def __init__(self, count: int, tag: str | None = None) -> None:
        # The tag is the pid (plus a counter): unique per run, and sweep_stale can tell if the
        # run that made it is gone. Interface names must stay within 15 characters.
        NetnsTopology._made += 1
        self.tag = tag or f"{os.getpid()}x{NetnsTopology._made}"
        self.count = count
        self.subnet = 0
        self.bridge = f"{PREFIX}{self.tag}br"
        if len(self.bridge) > 15:
            raise ValueError(f"interface name {self.bridge!r} is too long")
        self.cut_links: set[frozenset[int]] = set()
        self.silenced: set[int] = set()
        self._created = False

    _made = 0

    # -- names ---------------------------------------------------------------------------

    def nodes(self) -> list[int]:
        """Node numbers, 1..count."""
        return list(range(1, self.count + 1))

    def namespace(self, i: int) -> str:
        """Node i's namespace name."""
        return f"{NS_MARK}{self.tag}-{i}"

    def address(self, i: int) -> str:
        """Node i's IPv4 address (its only one besides loopback)."""
        return f"10.77.{self.subnet}.{10 + i}"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge: where chunk servers and clients listen."""
        return f"10.77.{self.subnet}.1"

    def exec_prefix(self, i: int) -> list[str]:
        """Prepend to a command to run it inside node i's namespace (`ip netns exec` execs in
        place: the process keeps the pid the caller started)."""
        return ["ip", "netns", "exec", self.namespace(i)]

    def _root_veth(self, i: int) -> str:
        return f"{PREFIX}{self.tag}r{i}"

    def _ip(self, i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "-n", self.namespace(i), *args, check=check)

    # -- life ----------------------------------------------------------------------------

    def create(self) -> None:
        """Make the namespaces, the bridge and every link, all up. Call destroy() to undo,
        even if this fails half-way."""
        self._created = True
        self.subnet = _free_subnet()
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i in self.nodes():
            ns = self.namespace(i)
            _run("ip", "netns", "add", ns)
            self._ip(i, "link", "set", "lo", "up")
            root = self._root_veth(i)
            _run("ip", "link", "add", root, "type", "veth", "peer", "name", "up0", "netns", ns)
            _run("ip", "link", "set", root, "master", self.bridge)
            _run("bridge", "link", "set", "dev", root, "isolated", "on")
            _run("ip", "link", "set", root, "up")
            self._ip(i, "addr", "add", f"{self.address(i)}/24", "dev", "up0")
            self._ip(i, "link", "set", "up0", "up")
        for i, j in itertools.combinations(self.nodes(), 2):
            self._ip(i, "link", "add", f"p{j}", "type", "veth", "peer", "name", f"p{i}",
                     "netns", self.namespace(j))
            self._set_link(i, j, up=True)

    def destroy(self) -> None:
        """Remove every namespace (SIGKILL to any process still inside), link and the
        bridge. Idempotent; stop the daemons gracefully before, if that matters."""
        if not self._created:
            return
        for i in self.nodes():
            _kill_inside(self.namespace(i))
            # Deleting a namespace deletes its veths, and with them their peers.
            _run("ip", "netns", "del", self.namespace(i), check=False)
            _run("ip", "link", "del", self._root_veth(i), check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        self._created = False

    def leftovers(self) -> list[str]:
        """Namespaces and interfaces of this topology that still exist (for a test to check
        its cleanup)."""
        names = set(_run("ip", "netns", "list", check=False).stdout.split())
        links = _run("ip", "-o", "link", "show", check=False).stdout
        left = [self.namespace(i) for i in self.nodes() if self.namespace(i) in names]
        left += [n for n in [self.bridge, *map(self._root_veth, self.nodes())] if f" {n}:" in links or f" {n}@" in links]
        return left

    # -- partitions ----------------------------------------------------------------------

    def _set_link(self, i: int, j: int, up: bool) -> None:
        state = "up" if up else "down"
        for a, b in ((i, j), (j, i)):
            self._ip(a, "link", "set", f"p{b}", state)
        if up:
            for a, b in ((i, j), (j, i)):
                # An interface set down loses its routes; put the /32 back.
                self._ip(a, "route", "replace", f"{self.address(b)}/32", "dev", f"p{b}",
                         "src", self.address(a))

    def cut(self, i: int, j: int) -> None:
        """Cut the link between nodes i and j (both directions)."""
        key = frozenset((i, j))
        if key not in self.cut_links:
            self._set_link(i, j, up=False)
            self.cut_links.add(key)

    def silence(self, i: int) -> None:
        """Cut node i from the root namespace too (clients and chunk servers): packets to it
        vanish, as to a host whose cable is pulled; connections hang rather than fail."""
        if i not in self.silenced:
            _run("ip", "link", "set", self._root_veth(i), "down")
            self.silenced.add(i)

    def heal(self) -> None:
        """Restore every cut link, and every silenced node's link to the root namespace."""
        for key in sorted(self.cut_links, key=sorted):
            i, j = sorted(key)
            self._set_link(i, j, up=True)
        self.cut_links.clear()
        for i in sorted(self.silenced):
            _run("ip", "link", "set", self._root_veth(i), "up")
        self.silenced.clear()

    def partition(self, components: Iterable[Iterable[int]]) -> None:
        """Heal, then cut every link between nodes of different components (nodes left out
        of every component are isolated alone)."""
        self.heal()
        side: dict[int, int] = {}
        for k, component in enumerate(components):
            for i in component:
                side[i] = k
        for i, j in itertools.combinations(self.nodes(), 2):
            if side.get(i, -i) != side.get(j, -j):
                self.cut(i, j)

    def cut_all(self, pairs: Iterable[Sequence[int]]) -> None:
        """Heal, then cut exactly these links (any graph, e.g. a bridge or a ring)."""
        self.heal()
        for i, j in pairs:
            self.cut(i, j)

    def connected(self, i: int, j: int) -> bool:
        """Whether i and j can talk now (by our own record of cut links)."""
        return frozenset((i, j)) not in self.cut_links

    def link_states(self) -> dict[tuple[int, int], bool]:
        """Whether each link's end is up, as the kernel says (i's end of the i-j link; (0, i)
        for node i's link to the root namespace)."""
        out = {}
        text = _run("ip", "-o", "link", "show", check=False).stdout
        for i in self.nodes():
            line = next((ln for ln in text.splitlines() if f" {self._root_veth(i)}@" in ln), "")
            out[(0, i)] = ",UP" in line or "<UP" in line
        for i in self.nodes():
            text = self._ip(i, "-o", "link", "show", check=False).stdout
            for j in self.nodes():
                if j == i:
                    continue
                line = next((ln for ln in text.splitlines() if f" p{j}@" in ln), "")
                out[(i, j)] = ",UP" in line or "<UP" in line
        return out
