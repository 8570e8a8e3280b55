package proxy

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/time/rate"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/resume"
)

// The admin API: the operator's view of a gateway or a client sidecar and
// what the operator may do to its sessions (docs/operations.md).
//
//	GET    /sessions[?state=S[,S...]&route=R]  list (JSON)
//	GET    /sessions/{id}                       one session
//	DELETE /sessions/{id}                       end it now (both applications get a reset)
//	POST   /sessions/{id}/goaway                gateway: move it to a new link, {"gateway": "host:port"} to another address
//	GET    /healthz                             200 unless accepting connections fails
//	GET    /readyz                              200 unless draining or accepting fails
//	GET    /metrics                             Prometheus
//
// Errors are JSON {"code": ..., "message": ...} with the seeds' vocabulary
// (the API* constants); the protocol's REJECT codes carry the same names
// (docs/protocol.md section 9).

// Error codes of the admin API, and their HTTP status.
const (
	APIAccessDenied     = "AccessDeniedException"     // 401 without a token, 403 with a wrong one
	APIResourceNotFound = "ResourceNotFoundException" // 404
	APIConflict         = "ConflictException"         // 409: the session's state does not allow it
	APIValidation       = "ValidationException"       // 400 (405 for a method a path does not take)
	APIThrottling       = "ThrottlingException"       // 429, with Retry-After
	APIInternalServer   = "InternalServerException"   // 500
)

// APIError is the body of every error answer of the admin API.
type APIError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *APIError) Error() string { return e.Code + ": " + e.Message }

// AdminConfig configures the admin API of a Gateway or Client.
type AdminConfig struct {
	// Registry is served on /metrics (nil: no /metrics).
	Registry *prometheus.Registry
	// TokenFile, if set, holds the bearer token that every /sessions
	// request must carry (Authorization: Bearer TOKEN); /healthz, /readyz
	// and /metrics need none. The file is read again whenever it changes
	// (a token is rotated without a restart); leading and trailing white
	// space is ignored. Empty: no token is asked for, which is only safe
	// on a loopback address.
	TokenFile string
	// AuthFailureRate and AuthFailureBurst throttle failed token checks
	// per source IP: past the burst, every /sessions request from that IP
	// gets ThrottlingException until a token returns. 0: 1 per second,
	// burst 10.
	AuthFailureRate  rate.Limit
	AuthFailureBurst int
	// Logger receives operator actions and refused requests (nil: discard).
	Logger *slog.Logger
}

// adminTarget is what the admin API acts on: a Gateway or a Client.
type adminTarget interface {
	Sessions() []SessionInfo // a new slice: the listing filters it in place
	Session(id string) (SessionInfo, error)
	End(id, reason string) (SessionInfo, error)
	Draining() bool
	AcceptErr() error
}

// GatewayAdmin returns the admin API of g. It fails only if cfg.TokenFile
// cannot be read or holds no token.
func GatewayAdmin(g *Gateway, cfg AdminConfig) (http.Handler, error) {
	return newAdmin("gateway", g, g.GoAwayTo, cfg)
}

// ClientAdmin returns the admin API of c: as the gateway's, but a client
// cannot send GOAWAY (POST /sessions/{id}/goaway is a ValidationException
// there).
func ClientAdmin(c *Client, cfg AdminConfig) (http.Handler, error) {
	return newAdmin("client", c, nil, cfg)
}

type admin struct {
	side     string
	t        adminTarget
	goAway   func(id, addr, reason string) error // nil on a client
	log      *slog.Logger
	token    *tokenFile // nil: no token asked for
	throttle *authThrottle
	mux      *http.ServeMux
}

func newAdmin(side string, t adminTarget, goAway func(id, addr, reason string) error, cfg AdminConfig) (http.Handler, error) {
	a := &admin{side: side, t: t, goAway: goAway, log: cfg.Logger, mux: http.NewServeMux()}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	a.log = a.log.With("side", side, "component", "admin")
	if cfg.TokenFile != "" {
		a.token = &tokenFile{path: cfg.TokenFile}
		if _, err := a.token.sum(); err != nil {
			return nil, err
		}
	}
	r, burst := cfg.AuthFailureRate, cfg.AuthFailureBurst
	if r <= 0 {
		r = rate.Every(time.Second)
	}
	if burst <= 0 {
		burst = 10
	}
	a.throttle = &authThrottle{rate: r, burst: burst, m: map[string]*rate.Limiter{}}

	if cfg.Registry != nil {
		a.mux.Handle("GET /metrics", promhttp.HandlerFor(cfg.Registry, promhttp.HandlerOpts{}))
	}
	a.mux.HandleFunc("GET /healthz", a.healthz)
	a.mux.HandleFunc("GET /readyz", a.readyz)
	a.mux.HandleFunc("GET /sessions", a.auth(a.list))
	a.mux.HandleFunc("GET /sessions/{id}", a.auth(a.withID(a.get)))
	a.mux.HandleFunc("DELETE /sessions/{id}", a.auth(a.withID(a.end)))
	a.mux.HandleFunc("POST /sessions/{id}/goaway", a.auth(a.withID(a.move)))
	a.mux.HandleFunc("/", a.notFound)
	return a, nil
}

func (a *admin) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// writeJSON answers status with v as indented JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		status = http.StatusInternalServerError
		b.Reset()
		fmt.Fprintf(&b, "{\"code\": %q, \"message\": %q}\n", APIInternalServer, "encoding the answer: "+err.Error())
	}
	writeJSONHeader(w, status)
	w.Write(b.Bytes())
}

// writeJSONHeader sends the headers of every JSON answer and status.
func writeJSONHeader(w http.ResponseWriter, status int) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, &APIError{Code: code, Message: msg})
}

// apiError maps an error of a Gateway or Client method to its HTTP status
// and code: ErrNoSession is ResourceNotFound, a *resume.Error maps by its
// protocol code (the seeds' names are the same), anything else is
// InternalServer.
func apiError(err error) (int, string) {
	if errors.Is(err, ErrNoSession) {
		return http.StatusNotFound, APIResourceNotFound
	}
	var re *resume.Error
	if errors.As(err, &re) {
		switch re.Code {
		case frame.CodeAccessDenied:
			return http.StatusForbidden, APIAccessDenied
		case frame.CodeNotFound:
			return http.StatusNotFound, APIResourceNotFound
		case frame.CodeConflict:
			return http.StatusConflict, APIConflict
		case frame.CodeValidation:
			return http.StatusBadRequest, APIValidation
		case frame.CodeThrottled:
			return http.StatusTooManyRequests, APIThrottling
		}
	}
	return http.StatusInternalServerError, APIInternalServer
}

func writeErr(w http.ResponseWriter, err error) {
	status, code := apiError(err)
	msg := err.Error()
	var re *resume.Error
	if errors.As(err, &re) && re.Reason != "" {
		msg = re.Reason
	}
	writeError(w, status, code, msg)
}

func (a *admin) healthz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if err := a.t.AcceptErr(); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintf(w, "unhealthy: %s\n", strings.ReplaceAll(err.Error(), "\n", "; "))
		return
	}
	if a.t.Draining() {
		w.Write([]byte("ok (draining)\n"))
		return
	}
	w.Write([]byte("ok\n"))
}

func (a *admin) readyz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if a.t.Draining() {
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte("draining\n"))
		return
	}
	if err := a.t.AcceptErr(); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintf(w, "unhealthy: %s\n", strings.ReplaceAll(err.Error(), "\n", "; "))
		return
	}
	w.Write([]byte("ready\n"))
}

// knownStates are what ?state= may name.
var knownStates = map[string]bool{}

func init() {
	for _, s := range liveStates {
		knownStates[s.String()] = true
	}
}

func (a *admin) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	states := map[string]bool{}
	var route *string
	for k, vs := range q {
		switch k {
		case "state":
			for _, v := range vs {
				for _, s := range strings.Split(v, ",") {
					s = strings.ToUpper(strings.TrimSpace(s))
					if !knownStates[s] {
						writeError(w, http.StatusBadRequest, APIValidation,
							fmt.Sprintf("state %q: want CONNECTING, ACTIVE, DISCONNECTED or RECONNECTING (several: state=A,B)", s))
						return
					}
					states[s] = true
				}
			}
		case "route":
			if len(vs) != 1 {
				writeError(w, http.StatusBadRequest, APIValidation, "route: give it once")
				return
			}
			route = &vs[0]
		default:
			writeError(w, http.StatusBadRequest, APIValidation, fmt.Sprintf("unknown parameter %q: the filters are state and route", k))
			return
		}
	}
	list := a.t.Sessions()
	kept := list[:0] // filtered in place
	for _, si := range list {
		if len(states) > 0 && !states[si.State] || route != nil && si.Route != *route {
			continue
		}
		kept = append(kept, si)
	}
	writeSessionList(w, kept)
}

// writeSessionList answers {"count": N, "sessions": [...]} byte for byte
// as writeJSON would, but a session at a time through one small buffer:
// encoding the whole answer first held about a megabyte per 1,000
// sessions (the indented JSON, and a copy of the list), garbage that
// showed in the RSS of a gateway polled by a dashboard.
func writeSessionList(w http.ResponseWriter, list []SessionInfo) {
	writeJSONHeader(w, http.StatusOK)
	bw := bufio.NewWriterSize(w, 4096)
	fmt.Fprintf(bw, "{\n  \"count\": %d,\n  \"sessions\": [", len(list))
	var one bytes.Buffer
	enc := json.NewEncoder(&one)
	enc.SetIndent("    ", "  ")
	for i := range list {
		one.Reset()
		if err := enc.Encode(&list[i]); err != nil {
			// Plain fields cannot fail to encode; the status is out
			// already, so end the answer where it is.
			break
		}
		if i > 0 {
			bw.WriteByte(',')
		}
		bw.WriteString("\n    ")
		bw.Write(bytes.TrimSuffix(one.Bytes(), []byte("\n")))
	}
	if len(list) > 0 {
		bw.WriteString("\n  ")
	}
	bw.WriteString("]\n}\n")
	bw.Flush()
}

// sessionID is what /sessions lists as a session's id.
var sessionID = regexp.MustCompile(`^[0-9a-f]{16}$`)

// withID checks the {id} of the path (16 hex digits, as /sessions lists
// them) before h.
func (a *admin) withID(h func(w http.ResponseWriter, r *http.Request, id string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := strings.ToLower(r.PathValue("id"))
		if !sessionID.MatchString(id) {
			writeError(w, http.StatusBadRequest, APIValidation, fmt.Sprintf("session id %q: want 16 hex digits, as /sessions lists them", r.PathValue("id")))
			return
		}
		h(w, r, id)
	}
}

func (a *admin) get(w http.ResponseWriter, r *http.Request, id string) {
	si, err := a.t.Session(id)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, si)
}

func (a *admin) end(w http.ResponseWriter, r *http.Request, id string) {
	si, err := a.t.End(id, "ended by an operator (admin API)")
	if err != nil {
		writeErr(w, err)
		return
	}
	a.log.Info("admin: session ended", "session", id, "route", si.Route, "by", r.RemoteAddr)
	si.State = resume.StateClosed.String()
	writeJSON(w, http.StatusOK, si)
}

// maxBody bounds a request body of the admin API.
const maxBody = 4096

func (a *admin) move(w http.ResponseWriter, r *http.Request, id string) {
	if a.goAway == nil {
		writeError(w, http.StatusBadRequest, APIValidation,
			"a client sidecar cannot move a session: POST /sessions/"+id+"/goaway to its gateway's admin API")
		return
	}
	var body struct {
		Gateway *string `json:"gateway"`
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		writeError(w, http.StatusBadRequest, APIValidation, "body: "+err.Error())
		return
	}
	if len(bytes.TrimSpace(b)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&body); err != nil {
			writeError(w, http.StatusBadRequest, APIValidation, `body: want {"gateway": "host:port"} or nothing: `+err.Error())
			return
		}
		if dec.More() {
			writeError(w, http.StatusBadRequest, APIValidation, `body: want one JSON object, {"gateway": "host:port"}`)
			return
		}
	}
	addr := ""
	if body.Gateway != nil {
		addr = *body.Gateway
		if err := ValidateHostPort(addr); err != nil {
			writeError(w, http.StatusBadRequest, APIValidation, "gateway: "+err.Error())
			return
		}
		if len(addr) > frame.MaxAddr {
			writeError(w, http.StatusBadRequest, APIValidation, fmt.Sprintf("gateway: longer than %d bytes", frame.MaxAddr))
			return
		}
	}
	if err := a.goAway(id, addr, "operator request (admin API)"); err != nil {
		writeErr(w, err)
		return
	}
	a.log.Info("admin: session asked to move", "session", id, "to", addr, "by", r.RemoteAddr)
	writeJSON(w, http.StatusAccepted, map[string]any{"id": id, "gateway": addr, "status": "moving"})
}

// notFound answers what no route matched: 405 for a path that takes
// other methods, 404 for the rest.
func (a *admin) notFound(w http.ResponseWriter, r *http.Request) {
	var allow []string
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodDelete} {
		if m == r.Method {
			continue
		}
		r2 := r.Clone(r.Context())
		r2.Method = m
		if _, p := a.mux.Handler(r2); p != "/" && p != "" {
			allow = append(allow, m)
		}
	}
	if len(allow) > 0 {
		if allow[0] == http.MethodGet {
			allow = append(allow, http.MethodHead)
		}
		w.Header().Set("Allow", strings.Join(allow, ", "))
		writeError(w, http.StatusMethodNotAllowed, APIValidation, fmt.Sprintf("%s does not take %s (it takes %s)", r.URL.Path, r.Method, strings.Join(allow, ", ")))
		return
	}
	writeError(w, http.StatusNotFound, APIResourceNotFound, fmt.Sprintf("no endpoint %s (see /sessions, /healthz, /readyz, /metrics)", r.URL.Path))
}

// auth checks the bearer token before h, if one is configured. A source
// past its budget of failed checks is throttled before its token is even
// looked at.
func (a *admin) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if a.token == nil {
			h(w, r)
			return
		}
		ip := sourceIP(r.RemoteAddr)
		if d := a.throttle.wait(ip, time.Now()); d > 0 {
			secs := int(math.Ceil(d.Seconds()))
			w.Header().Set("Retry-After", strconv.Itoa(secs))
			writeError(w, http.StatusTooManyRequests, APIThrottling,
				fmt.Sprintf("too many requests with a missing or wrong token from %s; retry after %d s", ip, secs))
			return
		}
		want, err := a.token.sum()
		if err != nil {
			a.log.Error("admin: cannot check tokens", "err", err)
			writeError(w, http.StatusInternalServerError, APIInternalServer, "the admin token file cannot be read; see the log")
			return
		}
		given, ok := bearer(r)
		if !ok {
			a.throttle.failed(ip, time.Now())
			a.log.Warn("admin: request without a token refused", "method", r.Method, "path", r.URL.Path, "from", r.RemoteAddr)
			w.Header().Set("WWW-Authenticate", `Bearer realm="lifeline admin"`)
			writeError(w, http.StatusUnauthorized, APIAccessDenied, "this admin API needs a bearer token: Authorization: Bearer TOKEN")
			return
		}
		got := sha256.Sum256([]byte(given))
		if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			a.throttle.failed(ip, time.Now())
			a.log.Warn("admin: request with a wrong token refused", "method", r.Method, "path", r.URL.Path, "from", r.RemoteAddr)
			writeError(w, http.StatusForbidden, APIAccessDenied, "wrong token")
			return
		}
		h(w, r)
	}
}

// bearer returns the token of r's Authorization header.
func bearer(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

func sourceIP(remote string) string {
	if host, _, err := net.SplitHostPort(remote); err == nil {
		return host
	}
	return remote
}

// tokenFile is the admin token, read again when its file changes. Only
// its SHA-256 is kept, so that comparisons take the same time whatever
// the length of what is presented.
type tokenFile struct {
	path string

	mu      sync.Mutex
	modTime time.Time
	size    int64
	hash    [sha256.Size]byte
	loaded  bool
}

// sum returns the SHA-256 of the current token.
func (t *tokenFile) sum() ([sha256.Size]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	fi, err := os.Stat(t.path)
	if err != nil {
		return [sha256.Size]byte{}, fmt.Errorf("admin token file: %w", err)
	}
	if t.loaded && fi.ModTime().Equal(t.modTime) && fi.Size() == t.size {
		return t.hash, nil
	}
	b, err := os.ReadFile(t.path)
	if err != nil {
		return [sha256.Size]byte{}, fmt.Errorf("admin token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return [sha256.Size]byte{}, fmt.Errorf("admin token file %s is empty", t.path)
	}
	if strings.ContainsAny(tok, " \t\r\n") {
		return [sha256.Size]byte{}, fmt.Errorf("admin token file %s: the token must be one word (no white space inside)", t.path)
	}
	t.hash, t.modTime, t.size, t.loaded = sha256.Sum256([]byte(tok)), fi.ModTime(), fi.Size(), true
	return t.hash, nil
}

// CheckTokenFile reports whether path holds a usable admin token.
func CheckTokenFile(path string) error {
	_, err := (&tokenFile{path: path}).sum()
	return err
}

// authThrottle limits failed token checks per source IP.
type authThrottle struct {
	rate  rate.Limit
	burst int

	mu sync.Mutex
	m  map[string]*rate.Limiter
}

// maxThrottled bounds the sources remembered; past it, those whose
// budget is full again are forgotten.
const maxThrottled = 4096

// wait returns how long ip must wait before its next request may be
// checked (0: now).
func (a *authThrottle) wait(ip string, now time.Time) time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	l := a.m[ip]
	if l == nil {
		return 0
	}
	tok := l.TokensAt(now)
	if tok >= 1 {
		return 0
	}
	return time.Duration((1 - tok) / float64(a.rate) * float64(time.Second))
}

// failed spends one of ip's failed checks.
func (a *authThrottle) failed(ip string, now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	l := a.m[ip]
	if l == nil {
		if len(a.m) >= maxThrottled {
			for k, v := range a.m {
				if v.TokensAt(now) >= float64(a.burst) {
					delete(a.m, k)
				}
			}
		}
		l = rate.NewLimiter(a.rate, a.burst)
		a.m[ip] = l
	}
	l.AllowN(now, 1)
}
