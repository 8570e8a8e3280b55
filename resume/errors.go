package resume

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// Code is the protocol's error vocabulary; see frame.Code.
type Code = frame.Code

// Error is a session failure with a protocol code. Remote tells whether the
// peer sent it (in RESET or REJECT) or this side decided it.
type Error struct {
	Code    Code
	Reason  string
	Remote  bool
	Session SessionID
	// RetryAfter is the delay a gateway suggested with REJECT THROTTLED
	// (0: none).
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	who := "local"
	if e.Remote {
		who = "peer"
	}
	s := fmt.Sprintf("lifeline: %v", e.Code)
	if e.Session != (SessionID{}) {
		s += " (session " + e.Session.String() + ")"
	}
	if e.Reason != "" {
		s += ": " + e.Reason
	}
	return s + " [" + who + "]"
}

// Is matches the sentinel of the same code, so errors.Is(err,
// resume.ErrBufferLost) works whatever the reason and session.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Reason == "" && t.Session == (SessionID{}) && t.Code == e.Code
}

// Timeout reports whether the error is a timeout (net.Error).
func (e *Error) Timeout() bool { return e.Code == frame.CodeTimeout }

// Temporary is for net.Error; nothing here is temporary.
func (e *Error) Temporary() bool { return false }

// Sentinels, one per code, for errors.Is.
var (
	ErrClosedByPeer  = &Error{Code: frame.CodeNone}
	ErrAccessDenied  = &Error{Code: frame.CodeAccessDenied}
	ErrNotFound      = &Error{Code: frame.CodeNotFound}
	ErrConflict      = &Error{Code: frame.CodeConflict}
	ErrThrottled     = &Error{Code: frame.CodeThrottled}
	ErrValidation    = &Error{Code: frame.CodeValidation}
	ErrInternal      = &Error{Code: frame.CodeInternal}
	ErrBufferLost    = &Error{Code: frame.CodeBufferLost}
	ErrVersion       = &Error{Code: frame.CodeVersion}
	ErrShuttingDown  = &Error{Code: frame.CodeShuttingDown}
	ErrTimeout       = &Error{Code: frame.CodeTimeout}
	ErrAppReset      = &Error{Code: frame.CodeAppReset}
	ErrUpstream      = &Error{Code: frame.CodeUpstream}
	ErrLimit         = &Error{Code: frame.CodeLimit}
	ErrNotStarted    = &Error{Code: frame.CodeNotStarted}
	ErrServerClosed  = errors.New("resume: server closed")
	ErrWriteClosed   = errors.New("resume: write after CloseWrite")
	ErrConnClosed    = errors.New("resume: use of closed connection")
	errLivenessTimer = errors.New("no frame received within the liveness timeout")
)

// errDeadline is returned when a Read or Write deadline passes. It is
// os.ErrDeadlineExceeded, a net.Error whose Timeout() is true, as for
// net.TCPConn.
var errDeadline = os.ErrDeadlineExceeded

func newError(code Code, sid SessionID, format string, args ...any) *Error {
	return &Error{Code: code, Session: sid, Reason: fmt.Sprintf(format, args...)}
}

// SessionID identifies a session; chosen by the gateway at random.
type SessionID [frame.SessionIDLen]byte

func (s SessionID) String() string { return hex.EncodeToString(s[:8]) }

// Codes re-exported for callers of Reset that do not import frame.
const (
	CodeNone     = frame.CodeNone
	CodeAppReset = frame.CodeAppReset
	CodeUpstream = frame.CodeUpstream
	CodeInternal = frame.CodeInternal
	CodeTimeout  = frame.CodeTimeout
)
