package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// FuzzStatusAPI sends arbitrary methods, paths and bodies, parsed as the
// HTTP server would parse them, to the gateway's status handler with one
// live session: never a panic, and never a 5xx (the gateway is healthy,
// so every answer is 2xx, a redirect or a 4xx for a bad request).
func FuzzStatusAPI(f *testing.F) {
	s := newStack(f, stackOpts{upstream: testnet.EchoServer(f)})
	c := dialApp(f, s.appAddr)
	defer c.Close()
	c.Write([]byte("ping"))
	io.ReadFull(c, make([]byte, 4))
	id := s.gw.Sessions()[0].ID
	h := GatewayStatusHandler(s.metrics.Registry(), s.gw)

	for _, seed := range []struct{ method, path, body string }{
		{"GET", "/healthz", ""},
		{"GET", "/metrics", ""},
		{"GET", "/sessions", ""},
		{"POST", "/sessions/" + id + "/goaway", ""},
		{"POST", "/sessions/0000000000000000/goaway", "x"},
		{"POST", "/sessions//goaway", ""},
		{"POST", "/sessions/%2e%2e/goaway", ""},
		{"POST", "/sessions/" + id + "/goaway/", ""},
		{"GET", "/sessions/" + id + "/goaway", ""},
		{"DELETE", "/sessions", "{}"},
		{"HEAD", "/metrics", ""},
		{"OPTIONS", "*", ""},
		{"CONNECT", "host:443", ""},
		{"GET", "//healthz/../sessions", ""},
		{"GET", "/%zz", ""},
		{"POST", "/sessions/\u00e9\u00e9/goaway", strings.Repeat("a", 100)},
		{"GET", "http://other/healthz", ""},
	} {
		f.Add(seed.method, seed.path, seed.body)
	}
	f.Fuzz(func(t *testing.T, method, path, body string) {
		raw := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: status\r\nContent-Length: %d\r\n\r\n%s", method, path, len(body), body)
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		if err != nil {
			return // the server answers 400 before any handler
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("%s %q: HTTP %d %q", method, path, rec.Code, rec.Body.String())
		}
	})
}
