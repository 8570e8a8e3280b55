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
	"sync/atomic"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/proxy"
)

// Configuration names.
const (
	Direct       = "direct"
	Relay        = "relay"
	LifelineTCP  = "lifeline-tcp"
	LifelineTLS  = "lifeline-tls"
	LifelineQUIC = "lifeline-quic"
)

// AllConfigs lists every configuration, baselines first.
var AllConfigs = []string{Direct, Relay, LifelineTCP, LifelineTLS, LifelineQUIC}

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
	case cfg == Relay:
		r2, err := startProc(ctx, "relay2", r.bin, []string{"bench-relay", "--listen", "127.0.0.1:0", "--target", upstream}, "relay listening")
		if err != nil {
			return nil, err
		}
		r1, err := startProc(ctx, "relay1", r.bin, []string{"bench-relay", "--listen", "127.0.0.1:0", "--target", r2.addr("relay listening")}, "relay listening")
		if err != nil {
			r2.stop()
			return nil, err
		}
		s.procs = []*proc{r1, r2}
		s.entry = r1.addr("relay listening")
		return s, nil
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
	gw, err := startProc(ctx, "gateway", r.bin, gwArgs, "gateway listening", "status listening")
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
	cl, err := startProc(ctx, "client", r.bin, clArgs, "client listening", "status listening")
	if err != nil {
		gw.stop()
		if s.fault != nil {
			s.fault.Close()
		}
		return nil, err
	}
	s.procs = []*proc{cl, gw}
	s.entry = cl.addr("client listening")
	s.clientStatus = cl.addr("status listening")
	s.gatewayStatus = gw.addr("status listening")
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

// bulk is the throughput upstream. A connection starts with a mode byte:
// 'U' the client uploads until EOF, 'D' the server sends until the client's
// EOF, 'B' both at once. Uploaded bytes are counted in up.
type bulk struct{ up atomic.Int64 }

var bulkBuf = func() []byte {
	b := make([]byte, 64<<10)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}()

func (b *bulk) handle(c *net.TCPConn) {
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	if mode[0] == 'D' || mode[0] == 'B' {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				if _, err := c.Write(bulkBuf); err != nil {
					return
				}
			}
		}()
	}
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		b.up.Add(int64(n))
		if err != nil {
			break
		}
	}
	stop.Store(true)
	wg.Wait()
	c.CloseWrite()
}

// bulkStream runs one throughput stream for d and returns the bytes it
// received. It closes its sending side after d; the server then stops too.
func bulkStream(addr string, mode byte, d time.Duration) (int64, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	tc := c.(*net.TCPConn)
	if _, err := tc.Write([]byte{mode}); err != nil {
		return 0, err
	}
	end := time.Now().Add(d)
	werr := make(chan error, 1)
	go func() {
		if mode == 'U' || mode == 'B' {
			for time.Now().Before(end) {
				if _, err := tc.Write(bulkBuf); err != nil {
					werr <- err
					return
				}
			}
		} else {
			time.Sleep(time.Until(end))
		}
		werr <- tc.CloseWrite()
	}()
	buf := make([]byte, 64<<10)
	var got int64
	tc.SetReadDeadline(end.Add(60 * time.Second))
	for {
		n, err := tc.Read(buf)
		got += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			tc.Close()
			<-werr
			return got, err
		}
	}
	return got, <-werr
}

// status client: no keep-alive, so that nothing outlives a run.
var statusClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}

func getSessions(addr string) ([]proxy.SessionInfo, error) {
	resp, err := statusClient.Get("http://" + addr + "/sessions")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var v struct {
		Sessions []proxy.SessionInfo `json:"sessions"`
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
