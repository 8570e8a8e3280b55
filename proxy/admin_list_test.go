package proxy

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// fakeSessions is an adminTarget that lists n made-up sessions.
type fakeSessions struct{ list []SessionInfo }

func newFakeSessions(n int) *fakeSessions {
	f := &fakeSessions{}
	t0 := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	for i := range n {
		st := "ACTIVE"
		if i%3 == 1 {
			st = "DISCONNECTED"
		}
		f.list = append(f.list, SessionInfo{
			ID: fmt.Sprintf("%016x", 0x1000+i), Side: "gateway", Route: fmt.Sprintf("r%d", i%2), State: st,
			Confirmed: true, Peer: "127.0.0.1:40000", App: "127.0.0.1:6379", Started: t0.Add(time.Duration(i) * time.Second),
			AgeMS: int64(i), BytesSent: uint64(i) * 7, BytesReceived: uint64(i) * 11, Resumes: i % 4, RTTMS: 0.25,
		})
	}
	return f
}

func (f *fakeSessions) Sessions() []SessionInfo { return append([]SessionInfo(nil), f.list...) }
func (f *fakeSessions) Session(string) (SessionInfo, error) {
	return SessionInfo{}, nil
}
func (f *fakeSessions) End(string, string) (SessionInfo, error) { return SessionInfo{}, nil }
func (f *fakeSessions) Draining() bool                          { return false }
func (f *fakeSessions) AcceptErr() error                        { return nil }

// TestSessionListStreamsTheSameJSON: the listing, written a session at a
// time, is byte for byte what one indented encoding of the whole answer
// was, filters included.
func TestSessionListStreamsTheSameJSON(t *testing.T) {
	for _, n := range []int{0, 1, 5} {
		for _, query := range []string{"", "?state=DISCONNECTED", "?route=r1", "?route=none"} {
			f := newFakeSessions(n)
			a := &admin{t: f}
			rec := httptest.NewRecorder()
			a.list(rec, httptest.NewRequest(http.MethodGet, "/sessions"+query, nil))
			want := []SessionInfo{}
			for _, si := range f.list {
				if query == "?state=DISCONNECTED" && si.State != "DISCONNECTED" || query == "?route=r1" && si.Route != "r1" || query == "?route=none" {
					continue
				}
				want = append(want, si)
			}
			ref := httptest.NewRecorder()
			writeJSON(ref, http.StatusOK, map[string]any{"sessions": want, "count": len(want)})
			if rec.Code != http.StatusOK || !bytes.Equal(rec.Body.Bytes(), ref.Body.Bytes()) {
				t.Fatalf("%d sessions, %q: status %d, body\n%s\nwant\n%s", n, query, rec.Code, rec.Body, ref.Body)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/json; charset=utf-8" {
				t.Fatalf("Content-Type %q", ct)
			}
		}
	}
}

// BenchmarkSessionList is what listing 1,000 sessions allocates.
func BenchmarkSessionList(b *testing.B) {
	a := &admin{t: newFakeSessions(1000)}
	r := httptest.NewRequest(http.MethodGet, "/sessions", nil)
	b.ReportAllocs()
	for b.Loop() {
		a.list(discardWriter{}, r)
	}
}

// discardWriter is an http.ResponseWriter that keeps nothing.
type discardWriter struct{}

func (discardWriter) Header() http.Header         { return http.Header{} }
func (discardWriter) Write(p []byte) (int, error) { return len(p), nil }
func (discardWriter) WriteHeader(int)             {}
