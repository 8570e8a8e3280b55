package proxy

import (
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/lifeline-proxy/lifeline/resume"
)

// Metrics receives the proxy's events. Use NopMetrics when nothing is
// exported, or NewPromMetrics for Prometheus.
type Metrics interface {
	// SessionStarted counts a new session (side is "client" or "gateway").
	SessionStarted(side, route string)
	// SessionEnded counts an ended session by cause ("closed",
	// "app_reset", "buffer_lost", "upstream", ...).
	SessionEnded(side, route, cause string)
	// DialFailed counts failures to open a session: the client could not
	// reach the gateway, or the gateway could not reach the upstream.
	DialFailed(side, route string)
	// Track registers the live sessions of one proxy, for the gauges and
	// the per-session counters (bytes, resumes, link failures, replays).
	Track(side string, t *Tracker)
	// Refused counts a link or handshake the gateway refused, by a short
	// fixed reason (resume.ServerConfig.OnRefuse's labels) and the REJECT
	// code sent (CodeNone: the link was closed without one).
	Refused(reason string, code resume.Code)
	// Resumed observes the outage a session resumed after (0 for a
	// GOAWAY migration, which has none).
	Resumed(side string, outage time.Duration)
	// FirstResumedByte observes how long after a resume the first byte
	// moved on the new link.
	FirstResumedByte(side string, sinceAttach time.Duration)
}

// NopMetrics discards everything.
type NopMetrics struct{}

func (NopMetrics) SessionStarted(string, string)          {}
func (NopMetrics) SessionEnded(string, string, string)    {}
func (NopMetrics) DialFailed(string, string)              {}
func (NopMetrics) Track(string, *Tracker)                 {}
func (NopMetrics) Refused(string, resume.Code)            {}
func (NopMetrics) Resumed(string, time.Duration)          {}
func (NopMetrics) FirstResumedByte(string, time.Duration) {}

// Tracker is the set of live sessions of a Client or Gateway, plus totals
// of the ones that ended, so that counters never go backwards.
type Tracker struct {
	mu     sync.Mutex
	live   map[*tracked]struct{}
	totals Totals
	// failures, if set, counts refused resumes (the gateway's server).
	failures func() int64
	// unconfirmed, if set, counts sessions that got WELCOME but were not
	// yet confirmed by their client (the gateway's server).
	unconfirmed func() int
	// all, if set, lists every live session, tracked or not (the
	// gateway's server, whose unconfirmed sessions are not tracked), for
	// the sessions-by-state gauge.
	all func() []*resume.Conn
	// opening, if set, counts sessions being opened: a client's that
	// wait for their first link (CONNECTING, not tracked yet).
	opening func() int
	// appTrusted: the gateway names its clients' stated application
	// addresses to the upstream (GatewayConfig.TrustAppAddr).
	appTrusted bool
}

// Totals sums session counters.
type Totals struct {
	Active, Parked int // gauges: live sessions with a link, without one
	BytesSent      uint64
	BytesReceived  uint64
	Resumes        uint64
	LinkFailures   uint64
	BytesReplayed  uint64
	ResumeFailures uint64
	Unconfirmed    int // gauge: gateway sessions not yet confirmed
	// ByState counts live sessions by state (resume.State's names), the
	// gateway's unconfirmed ones included.
	ByState map[string]int
}

func newTracker() *Tracker { return &Tracker{live: map[*tracked]struct{}{}} }

func (t *Tracker) add(x *tracked) {
	t.mu.Lock()
	t.live[x] = struct{}{}
	t.mu.Unlock()
}

func (t *Tracker) remove(x *tracked) {
	st := x.conn.Stats()
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.live[x]; !ok {
		return
	}
	delete(t.live, x)
	t.totals.BytesSent += st.BytesSent
	t.totals.BytesReceived += st.BytesReceived
	t.totals.Resumes += uint64(st.Resumes)
	t.totals.LinkFailures += uint64(st.LinkFailures)
	t.totals.BytesReplayed += st.BytesReplayed
}

// Totals returns the counters of ended and live sessions and the gauges.
func (t *Tracker) Totals() Totals {
	t.mu.Lock()
	defer t.mu.Unlock()
	tt := t.totals
	if t.failures != nil {
		tt.ResumeFailures = uint64(t.failures())
	}
	if t.unconfirmed != nil {
		tt.Unconfirmed = t.unconfirmed()
	}
	tt.ByState = map[string]int{}
	for x := range t.live {
		st := x.conn.Stats()
		if t.all == nil {
			tt.ByState[st.State.String()]++
		}
		tt.BytesSent += st.BytesSent
		tt.BytesReceived += st.BytesReceived
		tt.Resumes += uint64(st.Resumes)
		tt.LinkFailures += uint64(st.LinkFailures)
		tt.BytesReplayed += st.BytesReplayed
		switch st.State {
		case resume.StateActive, resume.StateConnecting:
			tt.Active++
		case resume.StateDisconnected, resume.StateReconnecting:
			tt.Parked++
		}
	}
	if t.opening != nil {
		tt.ByState[resume.StateConnecting.String()] += t.opening()
	}
	if t.all != nil {
		for _, c := range t.all() {
			if st := c.State(); st != resume.StateClosed {
				tt.ByState[st.String()]++
			}
		}
	}
	return tt
}

// SessionInfo describes one live session for the admin API.
type SessionInfo struct {
	ID    string `json:"id"`
	Node  string `json:"node,omitempty"` // the cluster node that holds it (its NodeID), if any
	Side  string `json:"side"`           // "client" or "gateway"
	Route string `json:"route"`
	State string `json:"state"` // CONNECTING, ACTIVE, DISCONNECTED, RECONNECTING (docs/protocol.md section 5.4); CLOSED once ended
	// Confirmed: the client has shown it holds the session (always true
	// on a client; a gateway's sessions are unconfirmed from WELCOME to
	// the client's first frame).
	Confirmed bool `json:"confirmed"`
	// Peer is the other proxy, as the current (or last) link sees it: the
	// gateway's address on a client, the client sidecar's on a gateway
	// (the one a trusted load balancer's PROXY header named, if any).
	Peer string `json:"peer"`
	// AppPeer, on a gateway, is the application's address the client
	// sidecar stated in HELLO (--send-app-addr), and AppPeerTrusted
	// whether the gateway believes it: then it, not Peer, is the source
	// in the PROXY header sent to the upstream (docs/security.md).
	AppPeer        string `json:"app_peer,omitempty"`
	AppPeerTrusted bool   `json:"app_peer_trusted,omitempty"`
	// App is the TCP end this side splices the session to: the
	// application's address on a client, the upstream's on a gateway.
	App string `json:"app"`
	// Started is when this side took the session (zero for a gateway
	// session not taken yet: unconfirmed, or waiting to be); AgeMS is
	// the time since then.
	Started time.Time `json:"started,omitzero"`
	AgeMS   int64     `json:"age_ms"`
	// OutageMS is how long the link has been down, while the session is
	// DISCONNECTED or RECONNECTING; 0 while a link is attached.
	OutageMS           int64   `json:"outage_ms"`
	LastOutageMS       int64   `json:"last_outage_ms"` // the outage the last resume ended
	ReconnectTimeoutMS int64   `json:"reconnect_timeout_ms"`
	BytesSent          uint64  `json:"bytes_sent"`     // from this side's TCP end into the session
	BytesReceived      uint64  `json:"bytes_received"` // from the peer to this side's TCP end
	Resumes            int     `json:"resumes"`
	LinkFailures       int     `json:"link_failures"`
	BytesReplayed      uint64  `json:"bytes_replayed"`
	Buffered           int     `json:"buffered"`
	RTTMS              float64 `json:"rtt_ms"`
}

// info describes x (whose conn is conn) at now.
func (t *Tracker) info(side string, conn *resume.Conn, x *tracked, now time.Time) SessionInfo {
	st := conn.Stats()
	si := SessionInfo{
		ID: conn.SessionID().String(), Side: side, Route: x.route, State: st.State.String(), Confirmed: conn.Confirmed(),
		Peer: conn.RemoteAddr().String(), App: x.app, Started: x.started,
		OutageMS: t.outageSoFar(x, st, now).Milliseconds(), LastOutageMS: st.LastOutage.Milliseconds(),
		ReconnectTimeoutMS: conn.ReconnectTimeout().Milliseconds(),
		BytesSent:          st.BytesSent, BytesReceived: st.BytesReceived, Resumes: st.Resumes,
		LinkFailures: st.LinkFailures, BytesReplayed: st.BytesReplayed, Buffered: st.Buffered,
		RTTMS: float64(st.RTT.Microseconds()) / 1000,
	}
	if !x.started.IsZero() {
		si.AgeMS = now.Sub(x.started).Milliseconds()
	}
	if n := conn.SessionID().Node(); !n.IsZero() {
		si.Node = n.String()
	}
	if side == "gateway" {
		si.AppPeer = conn.PeerAppAddr()
		si.AppPeerTrusted = si.AppPeer != "" && t.appTrusted
	}
	return si
}

// Sessions lists the live sessions, oldest first.
func (t *Tracker) Sessions(side string) []SessionInfo {
	t.mu.Lock()
	xs := make([]*tracked, 0, len(t.live))
	for x := range t.live {
		xs = append(xs, x)
	}
	t.mu.Unlock()
	now := time.Now()
	out := make([]SessionInfo, 0, len(xs))
	for _, x := range xs {
		out = append(out, t.info(side, x.conn, x, now))
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Started.Before(out[j].Started) })
	return out
}

// Len is the number of live sessions.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.live)
}

// PromMetrics exports the proxy's metrics on a private registry.
type PromMetrics struct {
	reg     *prometheus.Registry
	starts  *prometheus.CounterVec
	ends    *prometheus.CounterVec
	dialErr *prometheus.CounterVec
	refused *prometheus.CounterVec

	outage    *prometheus.HistogramVec
	firstByte *prometheus.HistogramVec
	refusedBy *prometheus.CounterVec

	mu       sync.Mutex
	trackers map[string][]*Tracker
}

// NewPromMetrics returns metrics registered on their own registry.
func NewPromMetrics() *PromMetrics {
	m := &PromMetrics{
		reg: prometheus.NewRegistry(),
		starts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lifeline_session_starts_total", Help: "Sessions opened.",
		}, []string{"side", "route"}),
		ends: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lifeline_session_ends_total", Help: "Sessions ended, by cause.",
		}, []string{"side", "route", "cause"}),
		dialErr: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lifeline_dial_failures_total", Help: "Failures to reach the gateway (client) or the upstream (gateway).",
		}, []string{"side", "route"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lifeline_refusals_total", Help: "Links and handshakes the gateway refused, by reason (pending_flood, unconfirmed_limit, max_sessions, memory_budget, draining, bad_preamble, resume_proof, ...).",
		}, []string{"reason"}),
		refusedBy: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lifeline_handshake_refusals_total", Help: "Gateway only: links and handshakes refused, by the REJECT code sent (NONE: closed without one).",
		}, []string{"code"}),
		outage: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "lifeline_outage_seconds",
			Help:    "Outages that sessions resumed after, from the link's loss (as this side saw it) to the resume; a GOAWAY migration counts as 0.",
			Buckets: []float64{0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300},
		}, []string{"side"}),
		firstByte: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "lifeline_resume_first_byte_seconds",
			Help:    "Time from a resumed link's attach to the first byte moved on it, either way.",
			Buckets: []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5},
		}, []string{"side"}),
		trackers: map[string][]*Tracker{},
	}
	m.reg.MustRegister(m.starts, m.ends, m.dialErr, m.refused, m.refusedBy, m.outage, m.firstByte, collector{m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry is the registry to serve on /metrics.
func (m *PromMetrics) Registry() *prometheus.Registry { return m.reg }

func (m *PromMetrics) SessionStarted(side, route string) {
	m.starts.WithLabelValues(side, route).Inc()
}

func (m *PromMetrics) SessionEnded(side, route, cause string) {
	m.ends.WithLabelValues(side, route, cause).Inc()
}

func (m *PromMetrics) DialFailed(side, route string) { m.dialErr.WithLabelValues(side, route).Inc() }

func (m *PromMetrics) Refused(reason string, code resume.Code) {
	m.refused.WithLabelValues(reason).Inc()
	m.refusedBy.WithLabelValues(code.String()).Inc()
}

func (m *PromMetrics) Resumed(side string, outage time.Duration) {
	m.outage.WithLabelValues(side).Observe(outage.Seconds())
}

func (m *PromMetrics) FirstResumedByte(side string, d time.Duration) {
	m.firstByte.WithLabelValues(side).Observe(d.Seconds())
}

func (m *PromMetrics) Track(side string, t *Tracker) {
	m.mu.Lock()
	m.trackers[side] = append(m.trackers[side], t)
	m.mu.Unlock()
}

var (
	descActive   = prometheus.NewDesc("lifeline_sessions_active", "Live sessions with a link.", []string{"side"}, nil)
	descParked   = prometheus.NewDesc("lifeline_sessions_parked", "Live sessions without a link (DISCONNECTED or RECONNECTING).", []string{"side"}, nil)
	descBytes    = prometheus.NewDesc("lifeline_bytes_total", "Application bytes carried; dir=sent is from this side's applications into sessions.", []string{"side", "dir"}, nil)
	descResumes  = prometheus.NewDesc("lifeline_resumes_total", "Successful session resumes.", []string{"side"}, nil)
	descLinkFail = prometheus.NewDesc("lifeline_link_failures_total", "Links lost under live sessions.", []string{"side"}, nil)
	descResFail  = prometheus.NewDesc("lifeline_resume_failures_total", "Resumes refused by the gateway.", []string{"side"}, nil)
	descReplayed = prometheus.NewDesc("lifeline_replayed_bytes_total", "Bytes sent again after resumes.", []string{"side"}, nil)
	descUnconf   = prometheus.NewDesc("lifeline_sessions_unconfirmed", "Gateway sessions that got WELCOME but whose client has not yet confirmed them.", nil, nil)
	descByState  = prometheus.NewDesc("lifeline_sessions", "Live sessions by state (CONNECTING, ACTIVE, DISCONNECTED, RECONNECTING); a gateway's unconfirmed sessions included.", []string{"side", "state"}, nil)
)

// liveStates are the states lifeline_sessions always exports, 0 or not.
var liveStates = []resume.State{resume.StateConnecting, resume.StateActive, resume.StateDisconnected, resume.StateReconnecting}

type collector struct{ m *PromMetrics }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descActive, descParked, descBytes, descResumes, descLinkFail, descReplayed, descResFail, descUnconf, descByState} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	sides := map[string][]*Tracker{}
	for k, v := range c.m.trackers {
		sides[k] = append([]*Tracker(nil), v...)
	}
	c.m.mu.Unlock()
	for side, ts := range sides {
		t := Totals{ByState: map[string]int{}}
		for _, tr := range ts {
			x := tr.Totals()
			for k, v := range x.ByState {
				t.ByState[k] += v
			}
			t.Active += x.Active
			t.Parked += x.Parked
			t.BytesSent += x.BytesSent
			t.BytesReceived += x.BytesReceived
			t.Resumes += x.Resumes
			t.LinkFailures += x.LinkFailures
			t.BytesReplayed += x.BytesReplayed
			t.ResumeFailures += x.ResumeFailures
			t.Unconfirmed += x.Unconfirmed
		}
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(t.Active), side)
		ch <- prometheus.MustNewConstMetric(descParked, prometheus.GaugeValue, float64(t.Parked), side)
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(t.BytesSent), side, "sent")
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(t.BytesReceived), side, "received")
		ch <- prometheus.MustNewConstMetric(descResumes, prometheus.CounterValue, float64(t.Resumes), side)
		ch <- prometheus.MustNewConstMetric(descLinkFail, prometheus.CounterValue, float64(t.LinkFailures), side)
		ch <- prometheus.MustNewConstMetric(descReplayed, prometheus.CounterValue, float64(t.BytesReplayed), side)
		for _, st := range liveStates {
			ch <- prometheus.MustNewConstMetric(descByState, prometheus.GaugeValue, float64(t.ByState[st.String()]), side, st.String())
		}
		if side == "gateway" {
			ch <- prometheus.MustNewConstMetric(descResFail, prometheus.CounterValue, float64(t.ResumeFailures), side)
			ch <- prometheus.MustNewConstMetric(descUnconf, prometheus.GaugeValue, float64(t.Unconfirmed))
		}
	}
}

// find returns the live session whose id (as SessionInfo.ID shows it) is id.
func (t *Tracker) find(id string) *tracked {
	t.mu.Lock()
	defer t.mu.Unlock()
	for x := range t.live {
		if x.conn.SessionID().String() == id {
			return x
		}
	}
	return nil
}

// outageSoFar is how long x's link has been down at now (0 while one is
// attached).
func (t *Tracker) outageSoFar(x *tracked, st resume.Stats, now time.Time) time.Duration {
	if st.DownSince.IsZero() {
		return 0
	}
	return now.Sub(st.DownSince)
}
