package main

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// Safe default limits (issue 8, item 6): the budget is a quarter of the
// memory the process may use, the cgroup's limit winning when lower
// (v2 memory.max or v1 memory.limit_in_bytes, at any level up the tree);
// sessions are (soft RLIMIT_NOFILE - 64) / 2.
func TestAutoLimitsFromMachine(t *testing.T) {
	const meminfo = "MemTotal:        8000000 kB\nMemFree:         1000 kB\n"
	mem := int64(8000000 * 1024)
	cases := []struct {
		name     string
		m        machine
		budget   int64
		bsrc     string
		sessions int
	}{
		{"meminfo only", machine{meminfo: meminfo, nofile: 20000}, mem / 4, "MemTotal", 9968},
		{"cgroup v2 max", machine{meminfo: meminfo, cgroupLimits: []cgroupLimit{{"/sys/fs/cgroup/a/memory.max", "max\n"}}, nofile: 1024}, mem / 4, "MemTotal", 480},
		{"cgroup v2 limit", machine{meminfo: meminfo, cgroupLimits: []cgroupLimit{{"/sys/fs/cgroup/a/memory.max", "2147483648\n"}}, nofile: 1024}, 1 << 29, "/sys/fs/cgroup/a/memory.max", 480},
		{"cgroup parent lower", machine{meminfo: meminfo, cgroupLimits: []cgroupLimit{
			{"/sys/fs/cgroup/a/b/memory.max", "4294967296"}, {"/sys/fs/cgroup/a/memory.max", "1073741824"}}, nofile: 1024}, 1 << 28, "/sys/fs/cgroup/a/memory.max", 480},
		{"cgroup v1 unlimited", machine{meminfo: meminfo, cgroupLimits: []cgroupLimit{{"/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"}}, nofile: 1024}, mem / 4, "MemTotal", 480},
		{"cgroup above memory", machine{meminfo: meminfo, cgroupLimits: []cgroupLimit{{"/sys/fs/cgroup/memory.max", "99999999999999"}}, nofile: 1024}, mem / 4, "MemTotal", 480},
		{"cgroup only", machine{cgroupLimits: []cgroupLimit{{"/sys/fs/cgroup/memory/x/memory.limit_in_bytes", "400000000"}}, nofile: 1024}, 100000000, "memory.limit_in_bytes", 480},
		{"nothing known", machine{}, 0, "no limit", 0},
		{"tiny nofile", machine{meminfo: meminfo, nofile: 50}, mem / 4, "MemTotal", 1},
		{"infinite nofile", machine{meminfo: meminfo, nofile: 1<<63 - 1}, mem / 4, "MemTotal", maxAutoSessions},
		{"bad meminfo", machine{meminfo: "MemTotal: lots\n", nofile: 164}, 0, "no limit", 50},
	}
	for _, c := range cases {
		b, bsrc, n, _ := autoLimits(c.m)
		if b != c.budget || n != c.sessions || !strings.Contains(bsrc, c.bsrc) {
			t.Errorf("%s: budget %d (%s), sessions %d; want %d (%s), %d", c.name, b, bsrc, n, c.budget, c.bsrc, c.sessions)
		}
	}

	// Where the limits are looked for: own cgroup up to the root.
	files := map[string]string{
		"/r/a/b/memory.max": "max", "/r/a/memory.max": "1000", "/r/memory/x/memory.limit_in_bytes": "2000",
	}
	var tried []string
	got := cgroupLimits("4:memory:/x\n0::/a/b\n3:cpu:/y\n", "/r", func(p string) (string, bool) {
		tried = append(tried, p)
		v, ok := files[p]
		return v, ok
	})
	wantTried := "/r/memory/x/memory.limit_in_bytes /r/memory/memory.limit_in_bytes /r/a/b/memory.max /r/a/memory.max /r/memory.max"
	if strings.Join(tried, " ") != wantTried {
		t.Errorf("looked at %v, want %s", tried, wantTried)
	}
	if len(got) != 3 {
		t.Errorf("found %v, want the three files", got)
	}
}

// Both effective limits are printed at start with their sources; "auto"
// is the default and an explicit 0 still means no limit.
func TestGatewayPrintsEffectiveLimits(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	up := testnet.EchoServer(t)
	gw := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", up)
	m := gw.waitLog("gateway limits", 30*time.Second)
	want := min(int64(rl.Cur-reservedFDs)/2, maxAutoSessions)
	if n, _ := m["max_sessions"].(float64); int64(n) != want {
		t.Errorf("max_sessions %v, want (%d - 64) / 2 = %d", m["max_sessions"], rl.Cur, want)
	}
	if b, _ := m["memory_budget"].(float64); b <= 0 || !strings.Contains(m["memory_budget_from"].(string), "/ 4") {
		t.Errorf("memory budget %v from %v, want a quarter of the machine's memory", m["memory_budget"], m["memory_budget_from"])
	}

	gw0 := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", up,
		"--max-sessions", "0", "--memory-budget", "0")
	m = gw0.waitLog("gateway limits", 30*time.Second)
	if m["max_sessions"] != 0.0 || m["memory_budget"] != 0.0 || !strings.Contains(m["max_sessions_from"].(string), "no limit") {
		t.Errorf("explicit 0: %v", m)
	}

	path := writeFile(t, "gw.yaml", "gateway:\n  listen: 127.0.0.1:0\n  transport: tcp\n  max_sessions: 7\n  memory_budget: auto\n  routes:\n    - {name: a, upstream: "+up+"}\n")
	gwf := startProc(t, "gateway", "--config", path)
	m = gwf.waitLog("gateway limits", 30*time.Second)
	if m["max_sessions"] != 7.0 || m["max_sessions_from"] != "set" || m["memory_budget"].(float64) <= 0 {
		t.Errorf("config file max_sessions 7, memory_budget auto: %v", m)
	}

	code, _, stderr := runCLI("gateway", "--listen", "127.0.0.1:0", "--upstream", up, "--max-sessions", "-1")
	if code != 2 || !strings.Contains(stderr, "auto") {
		t.Errorf("--max-sessions -1: exit %d, %q", code, stderr)
	}
}
