package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// options are the command-line flags of gateway and client.
type options struct {
	config       string
	listen       string   // client
	listens      addrList // gateway: --listen, repeatable
	upstream     string   // gateway
	gateway      string   // client
	route        string
	transport    string
	tls          transport.TLSFiles
	session      sessionFile
	logFormat    string
	logLevel     string
	adminAddr    string // --admin-addr
	statusAddr   string // --status-addr, its older name
	tokenFile    string // --admin-token-file
	drainTimeout duration
	pidFile      string // --pid-file
	// gateway limits ("auto" unless set)
	maxSessions    autoInt
	memoryBudget   autoSize
	connectTimeout duration
	maxRedials     int
	proxyProtocol  int
	proxyFrom      string // gateway: --proxy-protocol-from
	trustApp       bool   // gateway: --trust-client-app-addr
	sendApp        bool   // client: --send-app-addr
	stateDir       string // gateway
	// gateway cluster (cluster.go)
	nodeID, clusterListen, clusterKeyFile string
	clusterPeers                          addrList
}

// newFlagSet defines the flags of gateway or client on o. The defaults
// shown are the ones that apply: the session settings' are resume's
// (resume.DefaultConfig), the connect timeout's proxy's.
func newFlagSet(cmd string, o *options, stdout io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("lifeline "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	def := resume.DefaultConfig()
	o.session.ReconnectTimeout.D = def.ReconnectTimeout
	o.session.ReconnectInterval.D = defaultFixedInterval
	o.session.Buffer.N = int64(def.BufferSize)
	o.session.DisconnectedBuffer.N = int64(def.DisconnectedBufferSize)
	o.session.PingInterval.D = def.PingInterval
	o.session.LivenessTimeout.D = def.LivenessTimeout
	o.session.KeepaliveInterval.D = def.KeepaliveInterval
	o.session.HandshakeTimeout.D = def.HandshakeTimeout
	o.drainTimeout.D = defaultDrainTimeout
	o.connectTimeout.D = proxy.DefaultConnectTimeout

	fs.StringVar(&o.config, "config", "", "YAML config `file` (several routes); other flags then only set logging, status and drain")
	if cmd == "gateway" {
		fs.Var(addrListFlag{&o.listens}, "listen", "`address` to accept links from client sidecars on, e.g. 0.0.0.0:7000; repeat it to listen on several (sessions move between them with goaway --to)")
		fs.StringVar(&o.upstream, "upstream", "", "`address` of the service behind the gateway, e.g. 127.0.0.1:6379")
		fs.Var(autoIntFlag{&o.maxSessions}, "max-sessions", fmt.Sprintf("maximum `number` of live sessions, new ones refused beyond (default auto: (soft RLIMIT_NOFILE - %d) / 2; 0: no limit)", reservedFDs))
		fs.Var(autoSizeFlag{&o.memoryBudget}, "memory-budget", "`bytes` of buffers for all sessions, new sessions refused beyond (default auto: a quarter of the machine's memory or of its cgroup's limit; 0: no limit)")
		fs.Var(durationFlag{&o.connectTimeout}, "connect-timeout", "upstream connect timeout; the application gets a reset past it")
		fs.StringVar(&o.stateDir, "state-dir", "", "`directory` where a tls or quic gateway without --tls-cert keeps the key pair it generates once (default: "+stateDirHelp+"; here "+processStateDir()+")")
		fs.StringVar(&o.nodeID, "node-id", "", "this gateway's `name` in a cluster, hashed into the ids of the sessions it creates (default: host name/first --listen address)")
		fs.StringVar(&o.clusterListen, "cluster-listen", "", "UDP `address` the other gateways of the cluster connect to, e.g. 0.0.0.0:7100")
		fs.Var(commaListFlag{&o.clusterPeers}, "cluster-peers", "the cluster's gateways' cluster addresses, `host:port,...` (this one's may be among them)")
		fs.StringVar(&o.clusterKeyFile, "cluster-key-file", "", "`file` holding the cluster's shared secret (at least 32 bytes, mode 0600), which authenticates the gateways to each other")
		fs.IntVar(&o.proxyProtocol, "proxy-protocol", 0, "send a PROXY protocol header of this `version` (1 or 2) to the upstream, naming the client sidecar's address (0: off)")
		fs.StringVar(&o.proxyFrom, "proxy-protocol-from", "", "`CIDRs` (comma-separated; or IP addresses) of load balancers whose link connections must open with a PROXY protocol v1/v2 header naming the real client; a header from any other source is refused (tcp and tls transports only)")
		fs.BoolVar(&o.trustApp, "trust-client-app-addr", false, "believe the application addresses clients state (--send-app-addr) on links without mTLS too, and name them to upstreams with --proxy-protocol (with --tls-ca they are believed anyway)")
	} else {
		fs.StringVar(&o.listen, "listen", "", "local `address` applications connect to, e.g. 127.0.0.1:6380")
		fs.StringVar(&o.gateway, "gateway", "", "gateway `address`, e.g. gw.example.net:7000")
		fs.BoolVar(&o.sendApp, "send-app-addr", false, "state each application's address in its session's HELLO, for a gateway that names it to its upstream in a PROXY header (gateways of builds before this flag refuse such sessions)")
	}
	fs.StringVar(&o.route, "route", defaultRoute, "route `name` (the gateway maps it to an upstream)")
	fs.StringVar(&o.transport, "transport", defaultTransport, "link transport: tls, quic, or tcp (unauthenticated and unencrypted: for trusted networks only)")
	fs.Var(durationFlag{&o.session.ReconnectTimeout}, "reconnect-timeout", "how long a session waits for a new link (0 disables resumption)")
	fs.StringVar(&o.session.ReconnectStrategy, "reconnect-strategy", "backoff", "client redial strategy: "+backoffHelp()+" or fixed")
	fs.Var(durationFlag{&o.session.ReconnectInterval}, "reconnect-interval", "redial interval of the fixed strategy")
	fs.Var(sizeFlag{&o.session.Buffer}, "buffer", "replay buffer limit per direction (`bytes`, e.g. 2MiB)")
	fs.Var(sizeFlag{&o.session.DisconnectedBuffer}, "disconnected-buffer", "larger replay limit while the link is down (`bytes`)")
	fs.Var(durationFlag{&o.session.PingInterval}, "ping-interval", "send a PING after this long without traffic")
	fs.Var(durationFlag{&o.session.LivenessTimeout}, "liveness-timeout", "declare a link dead after this long without traffic")
	fs.Var(durationFlag{&o.session.KeepaliveInterval}, "keepalive-interval", "an idle link's client probes it after this long of silence, the gateway after twice it (on tcp and tls links the kernel's TCP keepalive probes, else a PING); 0: never (default for --transport quic, which has its own keep-alives)")
	fs.Var(toggleFlag{&o.session.KeepalivePing}, "keepalive-ping", "probe idle tcp and tls links with PING frames instead of the kernel's TCP keepalive, for a path through a load balancer that terminates TCP and times idle connections out")
	fs.Var(durationFlag{&o.session.HandshakeTimeout}, "handshake-timeout", "bound on dialing plus the session handshake of a link")
	fs.StringVar(&o.tls.Cert, "tls-cert", "", "TLS certificate `file` (PEM); reloaded on SIGHUP")
	fs.StringVar(&o.tls.Key, "tls-key", "", "TLS private key `file` (PEM); reloaded on SIGHUP")
	if cmd == "gateway" {
		fs.StringVar(&o.tls.CA, "tls-ca", "", "CA `file`: client certificates must chain to it (turns on mTLS)")
	} else {
		fs.StringVar(&o.tls.CA, "tls-ca", "", "CA `file` the gateway's certificate must chain to (default: system roots)")
	}
	fs.StringVar(&o.tls.ServerName, "tls-server-name", "", "expected gateway certificate `name` (default: the gateway host)")
	if cmd == "gateway" {
		o.tls.Pin = ""
	} else {
		fs.IntVar(&o.maxRedials, "max-redials", 0, fmt.Sprintf("reconnect attempts of all sessions in flight at once; the rest wait their turn (0: %d; negative: no cap)", resume.DefaultRedialGateLimit))
		fs.StringVar(&o.tls.Pin, "tls-pin", "", "SHA-256 `fingerprint` of the gateway's certificate (for a self-signed gateway; instead of --tls-ca)")
	}
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&o.adminAddr, "admin-addr", "", "`address` of the admin API: /sessions, /healthz, /readyz, /metrics (off if empty); beyond loopback it needs --admin-token-file")
	fs.StringVar(&o.statusAddr, "status-addr", "", "older name of --admin-addr")
	fs.StringVar(&o.tokenFile, "admin-token-file", "", "`file` holding the bearer token the admin API's /sessions requests must carry (re-read when it changes)")
	fs.Var(durationFlag{&o.drainTimeout}, "drain-timeout", "on SIGTERM/SIGINT, let sessions finish this long, then close them")
	fs.StringVar(&o.pidFile, "pid-file", "", "`file` to write the process id to once serving (removed at exit; kept current across USR2 upgrades); refuses to start if it names a running lifeline")
	fs.Usage = func() {
		fmt.Fprintf(stdout, "Usage of lifeline %s:\n", cmd)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	return fs
}

// backoffHelp describes resume's default redial strategy.
func backoffHelp() string {
	if b, ok := resume.DefaultStrategy().(resume.Backoff); ok {
		return fmt.Sprintf("backoff (at once, then %v doubling to %v, jittered)", b.Initial, b.Max)
	}
	return "backoff"
}

// parseFlags parses args with fs. --help prints fs.Usage once and returns
// flag.ErrHelp; a bad flag or value is a one-line usage error with a hint,
// without the usage text (the flag package would print it first).
func parseFlags(fs *flag.FlagSet, args []string) error {
	usage := fs.Usage
	fs.Usage = func() {}
	defer func() { fs.Usage = usage }()
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
			return err
		}
		return usagef("%v; run '%s --help' for usage", err, fs.Name())
	}
	return nil
}

// addrListFlag collects a repeated address flag.
type addrListFlag struct{ l *addrList }

func (f addrListFlag) String() string {
	if f.l == nil {
		return ""
	}
	return strings.Join(*f.l, ",")
}

func (f addrListFlag) Set(s string) error {
	*f.l = append(*f.l, s)
	return nil
}

// durationFlag and sizeFlag let flags fill the same fields as the file.
type durationFlag struct{ d *duration }

func (f durationFlag) String() string {
	if f.d == nil {
		return ""
	}
	return f.d.D.String()
}

func (f durationFlag) Set(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 {
		return fmt.Errorf("bad duration %q (want e.g. 250ms, 5s, 1m)", s)
	}
	f.d.D, f.d.Set = v, true
	return nil
}

type toggleFlag struct{ t *toggle }

func (f toggleFlag) String() string {
	if f.t == nil {
		return "false"
	}
	return strconv.FormatBool(f.t.B)
}

func (f toggleFlag) Set(s string) error {
	v, err := strconv.ParseBool(s)
	if err != nil {
		return fmt.Errorf("bad boolean %q (want true or false)", s)
	}
	f.t.B, f.t.Set = v, true
	return nil
}

func (f toggleFlag) IsBoolFlag() bool { return true }

type sizeFlag struct{ s *size }

func (f sizeFlag) String() string {
	if f.s == nil {
		return ""
	}
	return formatSize(f.s.N)
}

func (f sizeFlag) Set(v string) error {
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	f.s.N, f.s.Set = n, true
	return nil
}

type autoIntFlag struct{ a *autoInt }

func (f autoIntFlag) String() string {
	if f.a == nil || !f.a.Set {
		return "auto"
	}
	return strconv.Itoa(f.a.N)
}

func (f autoIntFlag) Set(s string) error {
	v, err := parseAutoInt(s)
	if err != nil {
		return err
	}
	*f.a = v
	return nil
}

type autoSizeFlag struct{ a *autoSize }

func (f autoSizeFlag) String() string {
	if f.a == nil || !f.a.Set {
		return "auto"
	}
	return formatSize(f.a.N)
}

func (f autoSizeFlag) Set(s string) error {
	v, err := parseAutoSize(s)
	if err != nil {
		return err
	}
	*f.a = v
	return nil
}
