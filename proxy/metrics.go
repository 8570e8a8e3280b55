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
	// fixed reason (resume.ServerConfig.OnRefuse's labels).
	Refused(reason string)
}

// NopMetrics discards everything.
type NopMetrics struct{}

func (NopMetrics) SessionStarted(string, string)       {}
func (NopMetrics) SessionEnded(string, string, string) {}
func (NopMetrics) DialFailed(string, string)           {}
func (NopMetrics) Track(string, *Tracker)              {}
func (NopMetrics) Refused(string)                      {}

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
	for x := range t.live {
		st := x.conn.Stats()
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
	return tt
}

// SessionInfo describes one live session for the status endpoint.
type SessionInfo struct {
	ID            string    `json:"id"`
	Side          string    `json:"side"`
	Route         string    `json:"route"`
	State         string    `json:"state"`
	Peer          string    `json:"peer"` // app address (client) or upstream (gateway)
	Link          string    `json:"link"`
	Started       time.Time `json:"started"`
	BytesSent     uint64    `json:"bytes_sent"`
	BytesReceived uint64    `json:"bytes_received"`
	Resumes       int       `json:"resumes"`
	LinkFailures  int       `json:"link_failures"`
	LastOutageMS  int64     `json:"last_outage_ms"`
	BytesReplayed uint64    `json:"bytes_replayed"`
	Buffered      int       `json:"buffered"`
	RTTMS         float64   `json:"rtt_ms"`
}

// Sessions lists the live sessions, oldest first.
func (t *Tracker) Sessions(side string) []SessionInfo {
	t.mu.Lock()
	xs := make([]*tracked, 0, len(t.live))
	for x := range t.live {
		xs = append(xs, x)
	}
	t.mu.Unlock()
	out := make([]SessionInfo, 0, len(xs))
	for _, x := range xs {
		st := x.conn.Stats()
		out = append(out, SessionInfo{
			ID: x.conn.SessionID().String(), Side: side, Route: x.route, State: st.State.String(),
			Peer: x.app, Link: x.conn.RemoteAddr().String(), Started: x.started,
			BytesSent: st.BytesSent, BytesReceived: st.BytesReceived, Resumes: st.Resumes,
			LinkFailures: st.LinkFailures, LastOutageMS: st.LastOutage.Milliseconds(),
			BytesReplayed: st.BytesReplayed, Buffered: st.Buffered,
			RTTMS: float64(st.RTT.Microseconds()) / 1000,
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Started.Before(out[j].Started) })
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
		trackers: map[string][]*Tracker{},
	}
	m.reg.MustRegister(m.starts, m.ends, m.dialErr, m.refused, collector{m},
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

func (m *PromMetrics) Refused(reason string) { m.refused.WithLabelValues(reason).Inc() }

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
)

type collector struct{ m *PromMetrics }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descActive, descParked, descBytes, descResumes, descLinkFail, descReplayed, descResFail, descUnconf} {
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
		var t Totals
		for _, tr := range ts {
			x := tr.Totals()
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
		if side == "gateway" {
			ch <- prometheus.MustNewConstMetric(descResFail, prometheus.CounterValue, float64(t.ResumeFailures), side)
			ch <- prometheus.MustNewConstMetric(descUnconf, prometheus.GaugeValue, float64(t.Unconfirmed))
		}
	}
}

// find returns the live session whose id (as SessionInfo.ID shows it) is id.
func (t *Tracker) find(id string) *resume.Conn {
	t.mu.Lock()
	defer t.mu.Unlock()
	for x := range t.live {
		if x.conn.SessionID().String() == id {
			return x.conn
		}
	}
	return nil
}
