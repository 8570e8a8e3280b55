package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// Defaults of what the config file (and the flags) may leave out that no
// library fills in. The session settings default to resume's
// (resume.DefaultConfig), the connect timeout to proxy's
// (proxy.DefaultConnectTimeout).
const (
	defaultTransport = "tls"
	defaultRoute     = "default"
	// defaultFixedInterval is the redial interval of the fixed strategy
	// (resume.FixedInterval), Diffusion's default.
	defaultFixedInterval = 5 * time.Second
	defaultDrainTimeout  = 30 * time.Second
)

// duration is a time.Duration written as "60s", "250ms", "1m30s".
type duration struct {
	D   time.Duration
	Set bool
}

func (d *duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil || v < 0 {
		return fmt.Errorf("line %d: bad duration %q (want e.g. 250ms, 5s, 1m)", n.Line, n.Value)
	}
	d.D, d.Set = v, true
	return nil
}

// toggle is a yes/no setting that a route may set over its gateway's.
type toggle struct {
	B   bool
	Set bool
}

func (t *toggle) UnmarshalYAML(n *yaml.Node) error {
	v, err := strconv.ParseBool(n.Value)
	if err != nil || n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: bad boolean %q (want true or false)", n.Line, n.Value)
	}
	t.B, t.Set = v, true
	return nil
}

// size is a byte count written as "2MiB", "512KiB", "8M", "65536".
type size struct {
	N   int64
	Set bool
}

func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	lower := strings.ToLower(t)
	for _, u := range []struct {
		suf string
		m   int64
	}{{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"kb", 1000}, {"mb", 1000 * 1000}, {"gb", 1000 * 1000 * 1000},
		{"k", 1 << 10}, {"m", 1 << 20}, {"g", 1 << 30}, {"b", 1}} {
		if strings.HasSuffix(lower, u.suf) {
			mult = u.m
			t = strings.TrimSpace(t[:len(t)-len(u.suf)])
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<40)/mult {
		return 0, fmt.Errorf("bad size %q (want e.g. 2MiB, 512KiB, 65536)", s)
	}
	return n * mult, nil
}

func formatSize(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return strconv.FormatInt(n, 10)
}

func (s *size) UnmarshalYAML(n *yaml.Node) error {
	v, err := parseSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	s.N, s.Set = v, true
	return nil
}

// sessionFile holds the session settings shared by routes and listeners.
type sessionFile struct {
	ReconnectTimeout   duration `yaml:"reconnect_timeout"`
	ReconnectStrategy  string   `yaml:"reconnect_strategy"`
	ReconnectInterval  duration `yaml:"reconnect_interval"`
	Buffer             size     `yaml:"buffer"`
	DisconnectedBuffer size     `yaml:"disconnected_buffer"`
	PingInterval       duration `yaml:"ping_interval"`
	LivenessTimeout    duration `yaml:"liveness_timeout"`
	KeepaliveInterval  duration `yaml:"keepalive_interval"`
	KeepalivePing      toggle   `yaml:"keepalive_ping"`
	HandshakeTimeout   duration `yaml:"handshake_timeout"`
}

type routeFile struct {
	Name           string   `yaml:"name"`
	Upstream       string   `yaml:"upstream"`
	ConnectTimeout duration `yaml:"connect_timeout"`
	ProxyProtocol  int      `yaml:"proxy_protocol"`
	// Session settings of this route, over the gateway's (the seeds'
	// per-connector configuration).
	sessionFile `yaml:",inline"`
}

// addrList is one address or a list of them: "listen: 0.0.0.0:7000" or
// "listen: [0.0.0.0:7000, 0.0.0.0:7001]".
type addrList []string

func (a *addrList) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		*a = addrList{n.Value}
		return nil
	case yaml.SequenceNode:
		var l []string
		if err := n.Decode(&l); err != nil {
			return err
		}
		*a = l
		return nil
	}
	return fmt.Errorf("line %d: want an address or a list of addresses", n.Line)
}

type gatewayFile struct {
	// Listen is where links are accepted: one address or several (an
	// operator moves sessions between them with GOAWAY).
	Listen         addrList           `yaml:"listen"`
	Transport      string             `yaml:"transport"`
	TLS            transport.TLSFiles `yaml:"tls"`
	MaxSessions    autoInt            `yaml:"max_sessions"`
	MemoryBudget   autoSize           `yaml:"memory_budget"`
	MaxHandshakes  int                `yaml:"max_handshakes"`
	ConnectTimeout duration           `yaml:"connect_timeout"`
	// StateDir keeps the key pair a tls or quic gateway without a
	// certificate generates (--state-dir).
	StateDir string `yaml:"state_dir"`
	// ProxyProtocolFrom lists the load balancers (CIDRs or IPs) whose
	// links must open with a PROXY protocol header
	// (--proxy-protocol-from): one string, comma-separated, or a list.
	ProxyProtocolFrom addrList `yaml:"proxy_protocol_from"`
	// TrustClientAppAddr believes the application addresses clients
	// state without mTLS too (--trust-client-app-addr).
	TrustClientAppAddr bool `yaml:"trust_client_app_addr"`
	// NodeID and Cluster: cluster.go.
	NodeID      string      `yaml:"node_id"`
	Cluster     clusterFile `yaml:"cluster"`
	sessionFile `yaml:",inline"`
	Routes      []routeFile `yaml:"routes"`
}

type listenerFile struct {
	Listen      string             `yaml:"listen"`
	Gateway     string             `yaml:"gateway"`
	Route       string             `yaml:"route"`
	Transport   string             `yaml:"transport"`
	TLS         transport.TLSFiles `yaml:"tls"`
	sessionFile `yaml:",inline"`
	// SendAppAddr states each application's address in HELLO
	// (--send-app-addr).
	SendAppAddr bool `yaml:"send_app_addr"`
}

type clientFile struct {
	Listeners []listenerFile `yaml:"listeners"`
	// MaxRedials caps reconnect attempts in flight (proxy.ClientConfig);
	// 0: the default, negative: no cap.
	MaxRedials int `yaml:"max_redials"`
}

type logFile struct {
	Format string `yaml:"format"`
	Level  string `yaml:"level"`
}

// fileConfig is the YAML config file.
type fileConfig struct {
	Log logFile `yaml:"log"`
	// AdminAddr serves the admin API; StatusAddr is its older name.
	AdminAddr      string       `yaml:"admin_addr"`
	StatusAddr     string       `yaml:"status_addr"`
	AdminTokenFile string       `yaml:"admin_token_file"`
	DrainTimeout   duration     `yaml:"drain_timeout"`
	PIDFile        string       `yaml:"pid_file"`
	Gateway        *gatewayFile `yaml:"gateway"`
	Client         *clientFile  `yaml:"client"`
}

// loadConfig reads and strictly decodes a config file: unknown keys and
// bad values are errors naming the line.
func loadConfig(path string) (*fileConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return parseConfig(path, b)
}

// parseConfig strictly decodes the config file path holding b. Every
// error names the file and the line.
func parseConfig(path string, b []byte) (*fileConfig, error) {
	if line, what := badText(b); line > 0 {
		return nil, fmt.Errorf("config %s: line %d: %s", path, line, what)
	}
	var fc fileConfig
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&fc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("config %s: file is empty", path)
		}
		msg := oneLine(err.Error())
		if !lineRE.MatchString(msg) {
			msg = fmt.Sprintf("line %d: %s", errLine(msg, b), msg)
		}
		return nil, fmt.Errorf("config %s: %s", path, msg)
	}
	return &fc, nil
}

var (
	lineRE   = regexp.MustCompile(`\bline [0-9]+\b`)
	anchorRE = regexp.MustCompile(`^(unknown anchor|anchor) '(.*)' (referenced|value contains itself)$`)
)

// errLine finds the line of a YAML error that does not name one: the
// parser leaves it out when it is the first; for a few errors of the
// decoding the line is that of the first token it is about.
func errLine(msg string, b []byte) int {
	token := ""
	if m := anchorRE.FindStringSubmatch(msg); m != nil {
		token = "*" + m[2]
		if m[1] == "anchor" {
			token = "&" + m[2]
		}
	} else if strings.Contains(msg, "!!binary") {
		token = "!!binary"
	} else if strings.Contains(msg, "map merge") {
		token = "<<"
	} else if strings.Contains(msg, "aliasing") {
		token = "*"
	}
	if i := bytes.Index(b, []byte(token)); token != "" && i >= 0 {
		return 1 + bytes.Count(b[:i], []byte("\n"))
	}
	return 1
}

// badText finds what the YAML reader refuses without naming a line:
// invalid UTF-8 and control characters. It returns the 1-based line and
// what is wrong, or 0.
func badText(b []byte) (int, string) {
	line := 1
	for i := 0; i < len(b); {
		r, n := utf8.DecodeRune(b[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			return line, fmt.Sprintf("invalid UTF-8 (byte %#02x)", b[i])
		case r == '\n':
			line++
		case r == '\t' || r == '\r':
		case r < 0x20 || r == 0x7f || r >= 0x80 && r <= 0x9f && r != 0x85 || r == 0xfffe || r == 0xffff:
			return line, fmt.Sprintf("control character %U not allowed", r)
		}
		i += n
	}
	return 0, ""
}

func oneLine(s string) string {
	s = strings.TrimPrefix(s, "yaml: ")
	s = strings.ReplaceAll(s, "unmarshal errors:\n", "")
	parts := strings.Split(s, "\n")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	return strings.Join(parts, "; ")
}

// over returns s with every setting that o sets replaced by o's.
func (s sessionFile) over(o sessionFile) sessionFile {
	pick := func(a, b duration) duration {
		if b.Set {
			return b
		}
		return a
	}
	pickSize := func(a, b size) size {
		if b.Set {
			return b
		}
		return a
	}
	r := s
	r.ReconnectTimeout = pick(s.ReconnectTimeout, o.ReconnectTimeout)
	r.ReconnectInterval = pick(s.ReconnectInterval, o.ReconnectInterval)
	r.PingInterval = pick(s.PingInterval, o.PingInterval)
	r.LivenessTimeout = pick(s.LivenessTimeout, o.LivenessTimeout)
	r.KeepaliveInterval = pick(s.KeepaliveInterval, o.KeepaliveInterval)
	if o.KeepalivePing.Set {
		r.KeepalivePing = o.KeepalivePing
	}
	r.HandshakeTimeout = pick(s.HandshakeTimeout, o.HandshakeTimeout)
	r.Buffer = pickSize(s.Buffer, o.Buffer)
	r.DisconnectedBuffer = pickSize(s.DisconnectedBuffer, o.DisconnectedBuffer)
	if o.ReconnectStrategy != "" {
		r.ReconnectStrategy = o.ReconnectStrategy
	}
	return r
}

// sessionConfigFor is sessionConfig for a link transport: over quic, which
// has keep-alives and an idle timeout of its own, idle sessions send no
// keepalive PINGs unless keepalive_interval is set (docs/protocol.md
// section 7).
func (s sessionFile) sessionConfigFor(transport string) (*resume.Config, error) {
	c, err := s.sessionConfig()
	if err == nil && transport == "quic" && !s.KeepaliveInterval.Set {
		c.KeepaliveInterval = 0
	}
	return c, err
}

// sessionConfig applies s over the defaults.
func (s sessionFile) sessionConfig() (*resume.Config, error) {
	c := resume.DefaultConfig()
	if s.ReconnectTimeout.Set {
		c.ReconnectTimeout = s.ReconnectTimeout.D
	}
	if s.Buffer.Set {
		c.BufferSize = int(s.Buffer.N)
	}
	if s.DisconnectedBuffer.Set {
		c.DisconnectedBufferSize = int(s.DisconnectedBuffer.N)
	}
	if s.PingInterval.Set {
		c.PingInterval = s.PingInterval.D
	}
	if s.LivenessTimeout.Set {
		c.LivenessTimeout = s.LivenessTimeout.D
	}
	if s.KeepaliveInterval.Set {
		c.KeepaliveInterval = s.KeepaliveInterval.D
	}
	c.KeepalivePing = s.KeepalivePing.B
	if s.HandshakeTimeout.Set {
		c.HandshakeTimeout = s.HandshakeTimeout.D
	}
	switch s.ReconnectStrategy {
	case "", "backoff":
		if s.ReconnectInterval.Set {
			return nil, errors.New("reconnect_interval applies to the fixed strategy only")
		}
	case "fixed":
		iv := defaultFixedInterval
		if s.ReconnectInterval.Set {
			iv = s.ReconnectInterval.D
		}
		if iv <= 0 {
			return nil, errors.New("reconnect interval must be positive")
		}
		c.Strategy = resume.FixedInterval{Interval: iv}
	default:
		return nil, fmt.Errorf("reconnect strategy %q: want backoff or fixed", s.ReconnectStrategy)
	}
	if err := c.Validate(); err != nil {
		return nil, errors.New(strings.TrimPrefix(err.Error(), "resume: "))
	}
	return c, nil
}

func checkTransport(name string, tf transport.TLSFiles, gateway bool) error {
	if !transport.Known(name) {
		return fmt.Errorf("unknown transport %q (want tcp, tls or quic)", name)
	}
	if name == "tcp" && !tf.Empty() {
		return errors.New("TLS settings given but transport is tcp (use --transport tls)")
	}
	if (tf.Cert == "") != (tf.Key == "") {
		return errors.New("--tls-cert and --tls-key must be given together")
	}
	if gateway && tf.Pin != "" {
		return errors.New("--tls-pin is a client setting")
	}
	if gateway && tf.CA != "" && tf.Cert == "" {
		return errors.New("--tls-ca (mTLS) needs the gateway's own --tls-cert and --tls-key")
	}
	if tf.Pin != "" {
		if _, err := transport.ParseFingerprint(tf.Pin); err != nil {
			return err
		}
		if tf.CA != "" {
			return errors.New("give --tls-pin or --tls-ca, not both")
		}
	}
	return nil
}

// withDefaults returns fc with what a config may leave out filled in: the
// transport of the gateway and of each client listener, and the route of
// each client listener. fc is not changed.
func (fc *fileConfig) withDefaults() *fileConfig {
	out := *fc
	if fc.Gateway != nil {
		g := *fc.Gateway
		if g.Transport == "" {
			g.Transport = defaultTransport
		}
		out.Gateway = &g
	}
	if fc.Client != nil {
		c := *fc.Client
		c.Listeners = slices.Clone(fc.Client.Listeners)
		for i := range c.Listeners {
			l := &c.Listeners[i]
			if l.Route == "" {
				l.Route = defaultRoute
			}
			if l.Transport == "" {
				l.Transport = defaultTransport
			}
		}
		out.Client = &c
	}
	return &out
}

// validateGateway checks a gateway section, defaults filled in
// (withDefaults), completely. It does not change g.
func validateGateway(g *gatewayFile) error {
	if len(g.Listen) == 0 {
		return errors.New("gateway: listen address missing")
	}
	listens := map[string]bool{}
	for _, a := range g.Listen {
		if err := proxy.ValidateHostPort(a); err != nil {
			return fmt.Errorf("gateway listen: %v", err)
		}
		if _, port, _ := net.SplitHostPort(a); listens[a] && port != "0" {
			return fmt.Errorf("gateway: listen address %s given twice", a)
		}
		listens[a] = true
	}
	if err := checkTransport(g.Transport, g.TLS, true); err != nil {
		return fmt.Errorf("gateway: %v", err)
	}
	if g.ConnectTimeout.Set && g.ConnectTimeout.D <= 0 {
		return errors.New("gateway: connect_timeout must be positive")
	}
	if err := checkProxyFrom(g); err != nil {
		return err
	}
	if g.MaxSessions.N < 0 || g.MaxHandshakes < 0 {
		return errors.New("gateway: max_sessions and max_handshakes must not be negative")
	}
	if len(g.Routes) == 0 {
		return errors.New("gateway: no routes")
	}
	seen := map[string]bool{}
	for i, r := range g.Routes {
		if err := proxy.ValidateRouteName(r.Name); err != nil {
			return fmt.Errorf("gateway route %d: %v", i+1, err)
		}
		if seen[r.Name] {
			return fmt.Errorf("gateway: route %q defined twice", r.Name)
		}
		seen[r.Name] = true
		if r.Upstream == "" {
			return fmt.Errorf("gateway route %q: upstream missing", r.Name)
		}
		if err := proxy.ValidateHostPort(r.Upstream); err != nil {
			return fmt.Errorf("gateway route %q upstream: %v", r.Name, err)
		}
		if r.ConnectTimeout.Set && r.ConnectTimeout.D <= 0 {
			return fmt.Errorf("gateway route %q: connect_timeout must be positive", r.Name)
		}
		if r.ProxyProtocol != 0 && r.ProxyProtocol != 1 && r.ProxyProtocol != 2 {
			return fmt.Errorf("gateway route %q: proxy_protocol %d (want 0, 1 or 2)", r.Name, r.ProxyProtocol)
		}
	}
	if _, err := g.sessionFile.sessionConfig(); err != nil {
		return fmt.Errorf("gateway: %v", err)
	}
	for _, r := range g.Routes {
		if _, err := g.sessionFile.over(r.sessionFile).sessionConfig(); err != nil {
			return fmt.Errorf("gateway route %q: %v", r.Name, err)
		}
	}
	return validateCluster(g.NodeID, g.Cluster)
}

// validateClient checks a client section, defaults filled in
// (withDefaults), completely. It does not change c.
func validateClient(c *clientFile) error {
	if len(c.Listeners) == 0 {
		return errors.New("client: no listeners")
	}
	seen := map[string]bool{}
	for i, l := range c.Listeners {
		name := fmt.Sprintf("client listener %d", i+1)
		if l.Listen == "" {
			return fmt.Errorf("%s: listen address missing", name)
		}
		if err := proxy.ValidateHostPort(l.Listen); err != nil {
			return fmt.Errorf("%s listen: %v", name, err)
		}
		if seen[l.Listen] {
			return fmt.Errorf("%s: listen address %s used twice", name, l.Listen)
		}
		seen[l.Listen] = true
		if l.Gateway == "" {
			return fmt.Errorf("%s: gateway address missing", name)
		}
		if err := proxy.ValidateHostPort(l.Gateway); err != nil {
			return fmt.Errorf("%s gateway: %v", name, err)
		}
		if err := proxy.ValidateRouteName(l.Route); err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		if err := checkTransport(l.Transport, l.TLS, false); err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		if _, err := l.sessionFile.sessionConfig(); err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
	}
	return nil
}
