package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy"
)

// lifeline sessions: the admin API of a running gateway or client sidecar
// from the command line (docs/operations.md).

const sessionsUsage = `Usage:
  lifeline sessions [--state S[,S]] [--route R] [flags]   list the sessions
  lifeline sessions show ID [flags]                      one session
  lifeline sessions end ID [flags]                       end it now: both applications get a reset
  lifeline sessions goaway ID [--to HOST:PORT] [flags]   gateway: move it to a new link (at HOST:PORT)

Flags:
  --admin-addr ADDR   the --admin-addr of the gateway or client (default $LIFELINE_ADMIN_ADDR)
  --token-file FILE   file holding its admin token (default $LIFELINE_ADMIN_TOKEN_FILE)
  --json              print the API's JSON instead of a table or a sentence
  --timeout D         bound on the request (default 10s)

Exit codes: 0 done; 1 the admin API cannot be reached or failed
(InternalServerException); 2 a usage mistake (ValidationException
included); 3 AccessDeniedException (missing or wrong token); 4
ResourceNotFoundException (no such session); 5 ConflictException (the
session's state does not allow it, e.g. goaway on a parked session);
6 ThrottlingException (too many refused tokens; retry later).
`

// Exit codes of lifeline sessions beyond exitOK, exitRuntime and
// exitUsage, one per error kind of the admin API.
const (
	exitAccessDenied = 3
	exitNotFound     = 4
	exitConflict     = 5
	exitThrottled    = 6
)

// exitError is an error with its own exit code.
type exitError struct {
	code int
	error
}

func (e exitError) Unwrap() error { return e.error }

// apiExit maps an admin API error code to the exit code.
func apiExit(code string) int {
	switch code {
	case proxy.APIAccessDenied:
		return exitAccessDenied
	case proxy.APIResourceNotFound:
		return exitNotFound
	case proxy.APIConflict:
		return exitConflict
	case proxy.APIThrottling:
		return exitThrottled
	case proxy.APIValidation:
		return exitUsage
	}
	return exitRuntime
}

type sessionsCmd struct {
	addr, tokenFile string
	json            bool
	timeout         time.Duration
	state, route    string
	to              string
	stdout          io.Writer
}

func runSessions(args []string, stdout io.Writer) error {
	c := &sessionsCmd{stdout: stdout}
	fs := flag.NewFlagSet("lifeline sessions", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&c.addr, "admin-addr", os.Getenv("LIFELINE_ADMIN_ADDR"), "")
	fs.StringVar(&c.tokenFile, "token-file", os.Getenv("LIFELINE_ADMIN_TOKEN_FILE"), "")
	fs.BoolVar(&c.json, "json", false, "")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "")
	fs.StringVar(&c.state, "state", "", "")
	fs.StringVar(&c.route, "route", "", "")
	fs.StringVar(&c.to, "to", "", "")
	fs.Usage = func() { fmt.Fprint(stdout, sessionsUsage) }
	// Flags may come before and after the subcommand and the id.
	var pos []string
	for {
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if c.addr == "" {
		return usagef("--admin-addr is required (or LIFELINE_ADMIN_ADDR): the --admin-addr of the gateway or client")
	}
	if c.timeout <= 0 {
		return usagef("--timeout %v: must be positive", c.timeout)
	}
	sub := "list"
	if len(pos) > 0 {
		sub, pos = pos[0], pos[1:]
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	only := func(allowed ...string) error {
		for _, name := range []string{"state", "route", "to"} {
			if set[name] && !strings.Contains(" "+strings.Join(allowed, " ")+" ", " "+name+" ") {
				return usagef("--%s does not apply to 'lifeline sessions %s'", name, sub)
			}
		}
		return nil
	}
	wantID := func() (string, error) {
		if len(pos) != 1 {
			return "", usagef("'lifeline sessions %s' takes one session id (as the list shows it)", sub)
		}
		return pos[0], nil
	}
	switch sub {
	case "list", "ls":
		if err := only("state", "route"); err != nil {
			return err
		}
		if len(pos) > 0 {
			return usagef("unexpected argument %q; run 'lifeline sessions --help' for usage", pos[0])
		}
		return c.list()
	case "show", "get", "end", "goaway":
		id, err := wantID()
		if err != nil {
			return err
		}
		allowed := []string{}
		if sub == "goaway" {
			allowed = append(allowed, "to")
		}
		if err := only(allowed...); err != nil {
			return err
		}
		switch sub {
		case "end":
			return c.end(id)
		case "goaway":
			return c.goaway(id)
		}
		return c.show(id)
	}
	return usagef("unknown subcommand %q (want list, show, end or goaway); run 'lifeline sessions --help' for usage", sub)
}

// base is the admin API's URL.
func (c *sessionsCmd) base() string {
	if strings.Contains(c.addr, "://") {
		return strings.TrimRight(c.addr, "/")
	}
	return "http://" + c.addr
}

// call makes one request and decodes a 2xx answer into out (if set). Its
// raw body is returned too, for --json. An error answer becomes an
// exitError with its kind's exit code.
func (c *sessionsCmd) call(method, path string, body []byte, out any) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, c.base()+path, rd)
	if err != nil {
		return nil, usagef("--admin-addr %q: %v", c.addr, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.tokenFile != "" {
		b, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("token file: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(b)))
	}
	hc := &http.Client{Timeout: c.timeout}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("admin API at %s: %v", c.addr, errText(err))
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("admin API at %s: reading the answer: %v", c.addr, err)
	}
	if resp.StatusCode/100 != 2 {
		var ae proxy.APIError
		if json.Unmarshal(raw, &ae) != nil || ae.Code == "" {
			return nil, fmt.Errorf("admin API at %s: HTTP %d: %s", c.addr, resp.StatusCode, strings.TrimSpace(string(raw)))
		}
		msg := ae.Error()
		if ra := resp.Header.Get("Retry-After"); ra != "" {
			msg += " (retry after " + ra + " s)"
		}
		return nil, exitError{apiExit(ae.Code), errors.New(msg)}
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return nil, fmt.Errorf("admin API at %s: unexpected answer: %v", c.addr, err)
		}
	}
	return raw, nil
}

func (c *sessionsCmd) list() error {
	q := url.Values{}
	if c.state != "" {
		q.Set("state", c.state)
	}
	if c.route != "" {
		q.Set("route", c.route)
	}
	path := "/sessions"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var ans struct {
		Sessions []proxy.SessionInfo `json:"sessions"`
	}
	raw, err := c.call("GET", path, nil, &ans)
	if err != nil {
		return err
	}
	if c.json {
		_, err := c.stdout.Write(raw)
		return err
	}
	return writeSessionTable(c.stdout, ans.Sessions)
}

func (c *sessionsCmd) show(id string) error {
	var si proxy.SessionInfo
	raw, err := c.call("GET", "/sessions/"+url.PathEscape(id), nil, &si)
	if err != nil {
		return err
	}
	if c.json {
		_, err := c.stdout.Write(raw)
		return err
	}
	return writeSessionTable(c.stdout, []proxy.SessionInfo{si})
}

func (c *sessionsCmd) end(id string) error {
	var si proxy.SessionInfo
	raw, err := c.call("DELETE", "/sessions/"+url.PathEscape(id), nil, &si)
	if err != nil {
		return err
	}
	if c.json {
		_, err := c.stdout.Write(raw)
		return err
	}
	_, err = fmt.Fprintf(c.stdout, "ended session %s (%s, route %s): both applications get a reset; %s sent, %s received\n",
		si.ID, si.Side, si.Route, formatBytes(si.BytesSent), formatBytes(si.BytesReceived))
	return err
}

func (c *sessionsCmd) goaway(id string) error {
	var body []byte
	if c.to != "" {
		if err := proxy.ValidateHostPort(c.to); err != nil {
			return usagef("--to: %v", err)
		}
		body, _ = json.Marshal(map[string]string{"gateway": c.to})
	}
	raw, err := c.call("POST", "/sessions/"+url.PathEscape(id)+"/goaway", body, nil)
	if err != nil {
		return err
	}
	if c.json {
		_, err := c.stdout.Write(raw)
		return err
	}
	where := "a new link"
	if c.to != "" {
		where = "a new link to " + c.to
	}
	_, err = fmt.Fprintf(c.stdout, "session %s is moving to %s (its client resumes there; the old link works until then)\n", id, where)
	return err
}

// writeSessionTable prints sessions as the table of lifeline sessions.
func writeSessionTable(w io.Writer, ss []proxy.SessionInfo) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSIDE\tROUTE\tSTATE\tPEER\tAPP\tAGE\tOUTAGE\tRESUMES\tSENT\tRECEIVED")
	for _, s := range ss {
		state := s.State
		if !s.Confirmed {
			state += ",unconfirmed"
		}
		age := "-"
		if !s.Started.IsZero() {
			age = formatAge(time.Duration(s.AgeMS) * time.Millisecond)
		}
		outage := "-"
		if s.State == "DISCONNECTED" || s.State == "RECONNECTING" {
			outage = formatAge(time.Duration(s.OutageMS) * time.Millisecond)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", s.ID, s.Side, s.Route, state, s.Peer, s.App,
			age, outage, s.Resumes, formatBytes(s.BytesSent), formatBytes(s.BytesReceived))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "%d session(s)\n", len(ss))
	return err
}

// formatAge prints d to the second (to the tenth below 10 s).
func formatAge(d time.Duration) string {
	if d < 10*time.Second {
		return fmt.Sprintf("%.1fs", d.Seconds())
	}
	return d.Round(time.Second).String()
}

// formatBytes prints n in B, KiB, MiB or GiB.
func formatBytes(n uint64) string {
	switch {
	case n < 1<<10:
		return fmt.Sprintf("%dB", n)
	case n < 1<<20:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	case n < 1<<30:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30))
}
