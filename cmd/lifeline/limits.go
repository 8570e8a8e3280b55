package main

import (
	"bufio"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"go.yaml.in/yaml/v3"
)

// The gateway's --max-sessions and --memory-budget default to "auto":
// derived from the machine at start (autoLimits). An explicit 0 still
// means no limit.

// autoInt is a count that is "auto" unless Set.
type autoInt struct {
	N   int
	Set bool
}

func parseAutoInt(s string) (autoInt, error) {
	if strings.TrimSpace(s) == "auto" {
		return autoInt{}, nil
	}
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 0 {
		return autoInt{}, fmt.Errorf("bad count %q (want auto, 0 for no limit, or a positive number)", s)
	}
	return autoInt{N: n, Set: true}, nil
}

func (a *autoInt) UnmarshalYAML(n *yaml.Node) error {
	v, err := parseAutoInt(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	*a = v
	return nil
}

// autoSize is a byte count that is "auto" unless Set.
type autoSize struct {
	N   int64
	Set bool
}

func parseAutoSize(s string) (autoSize, error) {
	if strings.TrimSpace(s) == "auto" {
		return autoSize{}, nil
	}
	n, err := parseSize(s)
	if err != nil {
		return autoSize{}, fmt.Errorf("bad size %q (want auto, 0 for no limit, or e.g. 4GiB)", s)
	}
	return autoSize{N: n, Set: true}, nil
}

func (a *autoSize) UnmarshalYAML(n *yaml.Node) error {
	v, err := parseAutoSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	*a = v
	return nil
}

// gatewayLimits resolves the gateway's --max-sessions and --memory-budget
// ("auto" unless set); logLimits logs both with where they came from.
func gatewayLimits(g *gatewayFile, log *slog.Logger) (maxSessions int, budget int64, logLimits func()) {
	budget, bsrc, maxSessions, ssrc := autoLimits(readMachine())
	if g.MaxSessions.Set {
		maxSessions, ssrc = g.MaxSessions.N, "set"
	}
	if g.MemoryBudget.Set {
		budget, bsrc = g.MemoryBudget.N, "set"
	}
	if maxSessions == 0 {
		ssrc += "; 0: no limit"
	}
	if budget == 0 {
		bsrc += "; 0: no limit"
	}
	return maxSessions, budget, func() {
		log.Info("gateway limits", "max_sessions", maxSessions, "max_sessions_from", ssrc,
			"memory_budget", budget, "memory_budget_from", bsrc)
	}
}

// humanSize writes a byte count for people: 1.5GiB, 300MiB, 2048.
func humanSize(n int64) string {
	switch {
	case n >= 1<<30:
		return strconv.FormatFloat(float64(n)/(1<<30), 'f', 1, 64) + "GiB"
	case n >= 1<<20:
		return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + "MiB"
	}
	return strconv.FormatInt(n, 10)
}

// machine is what the automatic limits are derived from: the text of
// /proc/meminfo, of the memory limits of the process's cgroup and its
// ancestors (cgroup v2 memory.max, cgroup v1 memory.limit_in_bytes), and
// the soft RLIMIT_NOFILE.
type machine struct {
	meminfo      string
	cgroupLimits []cgroupLimit
	nofile       uint64 // soft limit; 0 if unknown
}

type cgroupLimit struct {
	file string // where it was read, for the log
	text string // "max", or bytes
}

// Reserved descriptors (listeners, status, logs, DNS, the runtime) before
// the per-session cost of --max-sessions auto.
const reservedFDs = 64

// maxAutoSessions bounds --max-sessions auto when the descriptor limit is
// huge (RLIM_INFINITY).
const maxAutoSessions = 1 << 24

// autoLimits derives the gateway's default limits: a memory budget of a
// quarter of the memory the process may use (physical memory, or its
// cgroup's limit if lower), and as many sessions as descriptors allow
// (each costs a link and an upstream socket: (soft RLIMIT_NOFILE - 64) / 2).
// A budget of 0 (no limit) comes back when the memory is unknown. src
// says where each number came from.
func autoLimits(m machine) (budget int64, budgetSrc string, sessions int, sessionsSrc string) {
	var mem int64
	if kb, ok := memTotalKB(m.meminfo); ok {
		mem = kb * 1024
		budgetSrc = "MemTotal " + humanSize(mem) + " / 4"
	}
	for _, l := range m.cgroupLimits {
		t := strings.TrimSpace(l.text)
		if t == "" || t == "max" {
			continue
		}
		n, err := strconv.ParseInt(t, 10, 64)
		// cgroup v1 writes "no limit" as a huge number.
		if err != nil || n <= 0 || (mem > 0 && n >= mem) || n >= 1<<62 {
			continue
		}
		mem = n
		budgetSrc = l.file + " " + humanSize(n) + " / 4"
	}
	if mem > 0 {
		budget = mem / 4
	} else {
		budgetSrc = "memory size unknown (no /proc/meminfo): no limit; set --memory-budget"
	}

	switch {
	case m.nofile == 0:
		sessions, sessionsSrc = 0, "descriptor limit unknown: no limit; set --max-sessions"
	case m.nofile <= reservedFDs+2:
		sessions = 1
		sessionsSrc = fmt.Sprintf("RLIMIT_NOFILE %d is too low for more: raise it (ulimit -n)", m.nofile)
	default:
		n := (m.nofile - reservedFDs) / 2
		sessions = int(min(n, maxAutoSessions, math.MaxInt32))
		sessionsSrc = fmt.Sprintf("(RLIMIT_NOFILE %d - %d) / 2", m.nofile, reservedFDs)
	}
	return budget, budgetSrc, sessions, sessionsSrc
}

// memTotalKB reads MemTotal from /proc/meminfo text.
func memTotalKB(meminfo string) (int64, bool) {
	sc := bufio.NewScanner(strings.NewReader(meminfo))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "MemTotal:" {
			n, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil || n <= 0 {
				return 0, false
			}
			if len(f) >= 3 && f[2] != "kB" {
				return 0, false
			}
			return n, true
		}
	}
	return 0, false
}

// readMachine reads this process's machine: /proc/meminfo, the memory
// limits of its cgroup and every ancestor (v2 unified or v1 memory
// hierarchy), and RLIMIT_NOFILE.
func readMachine() machine {
	var m machine
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		m.meminfo = string(b)
	}
	if b, err := os.ReadFile("/proc/self/cgroup"); err == nil {
		m.cgroupLimits = cgroupLimits(string(b), "/sys/fs/cgroup", func(p string) (string, bool) {
			b, err := os.ReadFile(p)
			return string(b), err == nil
		})
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err == nil {
		m.nofile = rl.Cur
	}
	return m
}

// cgroupLimits finds the memory limit files of the cgroups listed in
// /proc/self/cgroup text, from the process's own cgroup up to the root.
func cgroupLimits(selfCgroup, root string, read func(string) (string, bool)) []cgroupLimit {
	var out []cgroupLimit
	walk := func(base, rel, file string) {
		for dir := filepath.Join(base, rel); ; dir = filepath.Dir(dir) {
			p := filepath.Join(dir, file)
			if t, ok := read(p); ok {
				out = append(out, cgroupLimit{file: p, text: t})
			}
			if dir == base || !strings.HasPrefix(dir, base) {
				return
			}
		}
	}
	sc := bufio.NewScanner(strings.NewReader(selfCgroup))
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			// v2. Under a hybrid setup the unified tree has no memory
			// controller and memory.max is simply absent.
			walk(root, parts[2], "memory.max")
		case hasController(parts[1], "memory"):
			walk(filepath.Join(root, "memory"), parts[2], "memory.limit_in_bytes")
		}
	}
	return out
}

func hasController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}
