package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
)

// Configuration names.
const (
	Direct       = "direct"
	Relay        = "relay"
	TLSRelay     = "tls-relay"
	QUICRelay    = "quic-relay"
	HAProxy      = "haproxy"
	LifelineTCP  = "lifeline-tcp"
	LifelineTLS  = "lifeline-tls"
	LifelineQUIC = "lifeline-quic"
)

// AllConfigs lists every configuration, baselines first.
var AllConfigs = []string{Direct, Relay, TLSRelay, QUICRelay, HAProxy, LifelineTCP, LifelineTLS, LifelineQUIC}

// baselineFor is the configuration each baseline is the yardstick of:
// a baseline runs when it is asked for or when that configuration is.
// direct and relay always run (every ratio is against the same run).
var baselineFor = map[string]string{TLSRelay: LifelineTLS, QUICRelay: LifelineQUIC, HAProxy: LifelineTCP}

func isLifeline(cfg string) bool { return strings.HasPrefix(cfg, "lifeline-") }

func transportOf(cfg string) string { return strings.TrimPrefix(cfg, "lifeline-") }

// faultCapable: a faultnet.Relay (TCP only) can sit on the link.
func faultCapable(cfg string) bool { return cfg == LifelineTCP || cfg == LifelineTLS }

// stack is one configuration running on loopback in front of an upstream.
type stack struct {
	config string
	entry  string  // the address applications connect to
	procs  []*proc // proxy processes, the one next to the application first
	fault  *faultnet.Relay
	// status endpoints of lifeline's client and gateway
	clientStatus, gatewayStatus string
}

type stackOpts struct {
	fault      bool                     // put a faultnet.Relay between client and gateway
	session    []string                 // session flags for both lifeline processes
	clientOnly []string                 // extra flags for the client
	probe      func(entry string) error // checks the path end to end
}

// adminListening is the log message with the address of a proxy's
// status (admin) endpoint; "status listening" in older builds.
const adminListening = "admin listening|status listening"

// Liveness settings of the resume and soak scenarios.
const (
	pingInterval    = 100 * time.Millisecond
	livenessTimeout = 400 * time.Millisecond
)

func (r *runner) startStack(ctx context.Context, cfg, upstream string, o stackOpts) (*stack, error) {
	s := &stack{config: cfg}
	switch {
	case cfg == Direct:
		s.entry = upstream
		return s, nil
	case cfg == Relay || cfg == TLSRelay || cfg == QUICRelay:
		return r.startRelays(ctx, s, upstream, o)
	case cfg == HAProxy:
		return r.startHAProxies(ctx, s, upstream, o)
	case isLifeline(cfg):
	default:
		return nil, fmt.Errorf("unknown configuration %q", cfg)
	}
	tr := transportOf(cfg)
	common := []string{"--transport", tr, "--log-format", "json", "--log-level", "info",
		"--status-addr", "127.0.0.1:0", "--drain-timeout", "1s"}
	common = append(common, o.session...)
	gwArgs := append([]string{"gateway", "--listen", "127.0.0.1:0", "--upstream", upstream}, common...)
	clArgs := append([]string{"client", "--listen", "127.0.0.1:0"}, common...)
	clArgs = append(clArgs, o.clientOnly...)
	if tr != "tcp" {
		c, err := r.certFiles()
		if err != nil {
			return nil, err
		}
		gwArgs = append(gwArgs, "--tls-cert", c.ServerCert, "--tls-key", c.ServerKey, "--tls-ca", c.CA)
		clArgs = append(clArgs, "--tls-cert", c.ClientCert, "--tls-key", c.ClientKey, "--tls-ca", c.CA)
	}
	gw, err := startProc(ctx, "gateway", r.bin, gwArgs, r.profileEnv(cfg, "gateway"), "gateway listening", adminListening)
	if err != nil {
		return nil, err
	}
	link := gw.addr("gateway listening")
	if o.fault {
		if !faultCapable(cfg) {
			gw.stop()
			return nil, fmt.Errorf("%s: the fault relay carries TCP only", cfg)
		}
		fr, err := faultnet.NewRelay("127.0.0.1:0", link)
		if err != nil {
			gw.stop()
			return nil, err
		}
		s.fault = fr
		link = fr.Addr()
	}
	clArgs = append(clArgs, "--gateway", link)
	cl, err := startProc(ctx, "client", r.bin, clArgs, r.profileEnv(cfg, "client"), "client listening", adminListening)
	if err != nil {
		gw.stop()
		if s.fault != nil {
			s.fault.Close()
		}
		return nil, err
	}
	s.procs = []*proc{cl, gw}
	s.entry = cl.addr("client listening")
	s.clientStatus = cl.addr(adminListening)
	s.gatewayStatus = gw.addr(adminListening)
	// Check the path end to end: the QUIC transport, for one, may start
	// and still not carry anything.
	if o.probe != nil {
		if err := o.probe(s.entry); err != nil {
			s.close()
			return nil, fmt.Errorf("%s carries nothing: %w", cfg, err)
		}
	}
	return s, nil
}

func (s *stack) close() {
	if s == nil {
		return
	}
	for _, p := range s.procs {
		p.stop()
	}
	if s.fault != nil {
		s.fault.Close()
	}
}

// cpu returns the CPU seconds of each proxy process.
func (s *stack) cpu() []float64 {
	out := make([]float64, len(s.procs))
	for i, p := range s.procs {
		out[i], _ = p.cpuSeconds()
	}
	return out
}

func (s *stack) rss() []int64 {
	out := make([]int64, len(s.procs))
	for i, p := range s.procs {
		out[i], _ = p.rssKB()
	}
	return out
}

func (s *stack) procNames() []string {
	var out []string
	for _, p := range s.procs {
		out = append(out, p.name)
	}
	return out
}

// probeEcho checks one round trip through an echo upstream.
func probeEcho(entry string) error {
	c, err := net.DialTimeout("tcp", entry, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("probe")); err != nil {
		return err
	}
	_, err = io.ReadFull(c, make([]byte, 5))
	return err
}

// probeBulk checks that a download through a bulk upstream moves bytes.
func probeBulk(entry string) error {
	c, err := net.DialTimeout("tcp", entry, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{'D'}); err != nil {
		return err
	}
	_, err = io.ReadFull(c, make([]byte, 1024))
	return err
}

// server is an upstream service in the bench process.
type server struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func newServer(h func(*net.TCPConn)) (*server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &server{ln: ln, conns: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns[c] = struct{}{}
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				h(c.(*net.TCPConn))
				c.Close()
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
		}
	}()
	return s, nil
}

func (s *server) addr() string { return s.ln.Addr().String() }

func (s *server) close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// echoHandler echoes until EOF, then closes its side.
func echoHandler(c *net.TCPConn) {
	c.SetNoDelay(true)
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if err == io.EOF {
				c.CloseWrite()
				io.Copy(io.Discard, c)
			}
			return
		}
	}
}

// status client: no keep-alive, so that nothing outlives a run.
var statusClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}

// sessionInfo is what the bench reads of an entry of a proxy's
// /sessions: the application's address is "app" (in older builds the
// client listed it as "peer").
type sessionInfo struct {
	ID            string `json:"id"`
	State         string `json:"state"`
	Peer          string `json:"peer"`
	App           string `json:"app"`
	BytesReplayed uint64 `json:"bytes_replayed"`
	Resumes       int    `json:"resumes"`
	Buffered      int    `json:"buffered"` // unacknowledged and undelivered bytes
}

func getSessions(addr string) ([]sessionInfo, error) {
	resp, err := statusClient.Get("http://" + addr + "/sessions")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/sessions: %s", addr, resp.Status)
	}
	var v struct {
		Sessions []sessionInfo `json:"sessions"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return nil, err
	}
	return v.Sessions, nil
}

// getMetric sums the samples of a Prometheus metric (all label sets).
func getMetric(addr, name string) (float64, error) {
	resp, err := statusClient.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	var sum float64
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum, nil
}
