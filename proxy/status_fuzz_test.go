package proxy

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// FuzzStatusAPI sends arbitrary methods, paths, bodies and Authorization
// headers, parsed as the HTTP server would parse them, to the gateway's
// admin API with one live session, both without a token and with one:
// never a panic, and never a 5xx (the gateway is healthy and its token
// file readable, so every answer is 2xx, a redirect or a 4xx). An error
// answer is always the JSON {"code", "message"} of the API's vocabulary.
func FuzzStatusAPI(f *testing.F) {
	s := newStack(f, stackOpts{upstream: testnet.EchoServer(f), log: slog.New(slog.DiscardHandler)})
	c := dialApp(f, s.appAddr)
	defer c.Close()
	c.Write([]byte("ping"))
	io.ReadFull(c, make([]byte, 4))
	id := s.gw.Sessions()[0].ID
	open := s.gwAdmin(f)
	tok := filepath.Join(f.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("t0ken"), 0o600); err != nil {
		f.Fatal(err)
	}
	locked, err := GatewayAdmin(s.gw, AdminConfig{Registry: s.metrics.Registry(), TokenFile: tok, AuthFailureBurst: 1 << 30})
	if err != nil {
		f.Fatal(err)
	}

	for _, seed := range []struct{ method, path, body, auth string }{
		{"GET", "/healthz", "", ""},
		{"GET", "/readyz", "", ""},
		{"GET", "/metrics", "", ""},
		{"GET", "/sessions", "", "Bearer t0ken"},
		{"GET", "/sessions?state=active,RECONNECTING&route=default", "", "Bearer t0ken"},
		{"GET", "/sessions?state=", "", ""},
		{"GET", "/sessions?route=a&route=b", "", ""},
		{"GET", "/sessions/" + id, "", "Bearer t0ken"},
		{"GET", "/sessions/" + strings.ToUpper(id), "", "bearer t0ken"},
		{"POST", "/sessions/" + id + "/goaway", "", "Bearer t0ken"},
		{"POST", "/sessions/" + id + "/goaway", `{"gateway": "127.0.0.1:1"}`, "Bearer t0ken"},
		{"POST", "/sessions/" + id + "/goaway", `{"gateway": null}`, ""},
		{"POST", "/sessions/" + id + "/goaway", `{"gateway": "` + strings.Repeat("h", 300) + `:1"}`, ""},
		{"DELETE", "/sessions/0000000000000000", "", "Bearer t0ken"},
		{"DELETE", "/sessions/" + id + "x", "", "Bearer wrong"},
		{"POST", "/sessions/0000000000000000/goaway", "x", ""},
		{"POST", "/sessions//goaway", "", ""},
		{"POST", "/sessions/%2e%2e/goaway", "", ""},
		{"POST", "/sessions/" + id + "/goaway/", "", ""},
		{"GET", "/sessions/" + id + "/goaway", "", ""},
		{"DELETE", "/sessions", "{}", ""},
		{"PUT", "/sessions/" + id, "", ""},
		{"HEAD", "/metrics", "", ""},
		{"OPTIONS", "*", "", ""},
		{"CONNECT", "host:443", "", ""},
		{"GET", "//healthz/../sessions", "", ""},
		{"GET", "/%zz", "", ""},
		{"POST", "/sessions/\u00e9\u00e9/goaway", strings.Repeat("a", 100), "Basic x"},
		{"GET", "http://other/healthz", "", ""},
	} {
		f.Add(seed.method, seed.path, seed.body, seed.auth)
	}
	f.Fuzz(func(t *testing.T, method, path, body, auth string) {
		hdr := ""
		if auth != "" {
			hdr = "Authorization: " + auth + "\r\n"
		}
		raw := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: admin\r\n%sContent-Length: %d\r\n\r\n%s", method, path, hdr, len(body), body)
		for name, h := range map[string]http.Handler{"open": open, "token": locked} {
			req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
			if err != nil {
				return // the server answers 400 before any handler
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code >= 500 {
				t.Fatalf("%s: %s %q: HTTP %d %q", name, method, path, rec.Code, rec.Body.String())
			}
			if rec.Code >= 400 && method != "HEAD" && strings.HasPrefix(req.URL.Path, "/sessions") &&
				!strings.Contains(rec.Body.String(), `"code": "`) {
				t.Fatalf("%s: %s %q: HTTP %d without a JSON error: %q", name, method, path, rec.Code, rec.Body.String())
			}
		}
	})
}
