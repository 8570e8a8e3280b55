package main

import (
	"bufio"
	"flag"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// unitFile is a systemd unit: section -> key -> values (a key may repeat).
type unitFile map[string]map[string][]string

// parseUnit reads the subset of systemd's unit syntax the examples use:
// sections, key=value, comments, and lines continued with a backslash.
func parseUnit(t *testing.T, r io.Reader) unitFile {
	t.Helper()
	u := unitFile{}
	section := ""
	sc := bufio.NewScanner(r)
	var cont string
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if cont != "" {
			line = cont + " " + line
			cont = ""
		}
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if s, ok := strings.CutSuffix(line, "\\"); ok {
			cont = strings.TrimSpace(s)
			continue
		}
		if line[0] == '[' {
			if !strings.HasSuffix(line, "]") {
				t.Fatalf("line %d: bad section %q", n, line)
			}
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section == "" {
			t.Fatalf("line %d: not key=value in a section: %q", n, line)
		}
		u[section][strings.TrimSpace(k)] = append(u[section][strings.TrimSpace(k)], strings.TrimSpace(v))
	}
	if cont != "" {
		t.Fatal("file ends in a continued line")
	}
	return u
}

func (u unitFile) get(t *testing.T, section, key string) string {
	t.Helper()
	v := u[section][key]
	if len(v) != 1 {
		t.Fatalf("[%s] %s: %d values %q, want one", section, key, len(v), v)
	}
	return v[0]
}

// The example units say what docs/operations.md says: Type=notify with
// NotifyAccess=all for the upgrade's new process, ExecReload is USR2,
// PIDFile= is the --pid-file in ExecStart under the RuntimeDirectory, the
// stop timeout is above the default drain timeout, a gateway's state
// directory is its StateDirectory, the flags exist and may go with
// --config, and hardening is on. systemd-analyze verify, where installed,
// finds nothing to say.
func TestSystemdUnits(t *testing.T) {
	for _, side := range []string{"gateway", "client"} {
		t.Run(side, func(t *testing.T) {
			file := filepath.Join("..", "..", "docs", "systemd", "lifeline-"+side+".service")
			f, err := os.Open(file)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			u := parseUnit(t, f)
			for key, want := range map[string]string{
				"Type":            "notify",
				"NotifyAccess":    "all",
				"ExecReload":      "/bin/kill -USR2 $MAINPID",
				"KillSignal":      "SIGTERM",
				"NoNewPrivileges": "yes",
				"ProtectSystem":   "strict",
				"DynamicUser":     "yes",
				"Restart":         "on-failure",
			} {
				if got := u.get(t, "Service", key); got != want {
					t.Errorf("%s=%s, want %s", key, got, want)
				}
			}
			if u.get(t, "Service", "LimitNOFILE") == "" || u.get(t, "Install", "WantedBy") != "multi-user.target" {
				t.Error("LimitNOFILE or WantedBy missing")
			}
			stop, err := time.ParseDuration(u.get(t, "Service", "TimeoutStopSec"))
			if err != nil || stop <= defaultDrainTimeout {
				t.Errorf("TimeoutStopSec %v (%v): must be above the drain timeout %v", stop, err, defaultDrainTimeout)
			}

			args := strings.Fields(u.get(t, "Service", "ExecStart"))
			if !path.IsAbs(args[0]) || path.Base(args[0]) != "lifeline" || args[1] != side {
				t.Fatalf("ExecStart %q: want an absolute path to lifeline, then %s", args, side)
			}
			var o options
			fs := newFlagSet(side, &o, io.Discard)
			if err := parseFlags(fs, args[2:]); err != nil {
				t.Fatalf("ExecStart flags: %v", err)
			}
			fs.Visit(func(f *flag.Flag) {
				if !slices.Contains([]string{"config", "pid-file", "state-dir", "log-format", "log-level", "drain-timeout", "admin-addr", "admin-token-file"}, f.Name) {
					t.Errorf("ExecStart: --%s cannot go with --config", f.Name)
				}
			})
			if o.config == "" || o.pidFile == "" {
				t.Errorf("ExecStart without --config or --pid-file: %q", args)
			}
			if pf := u.get(t, "Service", "PIDFile"); pf != o.pidFile || path.Dir(pf) != "/run/"+u.get(t, "Service", "RuntimeDirectory") {
				t.Errorf("PIDFile=%s, --pid-file %s, RuntimeDirectory=%s: want one file in /run/<RuntimeDirectory>", pf, o.pidFile, u.get(t, "Service", "RuntimeDirectory"))
			}
			if side == "gateway" && o.stateDir != "/var/lib/"+u.get(t, "Service", "StateDirectory") {
				t.Errorf("--state-dir %s is not /var/lib/<StateDirectory=%s>", o.stateDir, u.get(t, "Service", "StateDirectory"))
			}

			analyze, err := exec.LookPath("systemd-analyze")
			if err != nil {
				t.Skip("systemd-analyze not installed: the unit's keys are checked above only")
			}
			// verify wants ExecStart's binary to exist: any executable.
			exe, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			unit := filepath.Join(t.TempDir(), "lifeline-"+side+".service")
			os.WriteFile(unit, []byte(strings.ReplaceAll(string(b), "/usr/local/bin/lifeline", exe)), 0o644)
			out, err := exec.Command(analyze, "verify", "--man=no", unit).CombinedOutput()
			var complaints []string
			for _, l := range strings.Split(string(out), "\n") {
				if strings.Contains(l, filepath.Base(unit)) {
					complaints = append(complaints, l)
				}
			}
			if err != nil || len(complaints) > 0 {
				t.Errorf("systemd-analyze verify: %v\n%s", err, out)
			}
		})
	}
}
