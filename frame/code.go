package frame

import "fmt"

// Code is the error vocabulary carried by RESET, GOAWAY and REJECT. The
// names follow the seeds' error vocabulary (AccessDenied, Conflict,
// InternalServer, ResourceNotFound, Throttling, Validation), plus what a
// byte stream needs.
type Code uint16

const (
	// CodeNone: an orderly close. In RESET: the sender closed both
	// directions after all its data was acknowledged.
	CodeNone Code = 0
	// CodeAccessDenied: the resume proof did not verify.
	CodeAccessDenied Code = 1
	// CodeNotFound: unknown or expired session, or unknown route.
	CodeNotFound Code = 2
	// CodeConflict: a replayed resume (counter not above the last accepted
	// one) or one racing a newer resume.
	CodeConflict Code = 3
	// CodeThrottled: too many failed attempts from this source; retry later.
	CodeThrottled Code = 4
	// CodeValidation: malformed frame, frame out of phase, offset or ack
	// outside what was sent, window exceeded.
	CodeValidation Code = 5
	// CodeInternal: the peer failed on its own (a bug, out of resources).
	CodeInternal Code = 6
	// CodeBufferLost: the data the peer needs is no longer held; the stream
	// cannot continue without a gap.
	CodeBufferLost Code = 7
	// CodeVersion: the peer does not speak this protocol version.
	CodeVersion Code = 8
	// CodeShuttingDown: the gateway is draining and takes no new sessions.
	CodeShuttingDown Code = 9
	// CodeTimeout: the session outlived its reconnect timeout, or a
	// handshake took too long.
	CodeTimeout Code = 10
	// CodeAppReset: the application on the sender's side reset its
	// connection; the receiver should reset its own.
	CodeAppReset Code = 11
	// CodeUpstream: the gateway could not reach the upstream service.
	CodeUpstream Code = 12
	// CodeLimit: a configured limit (sessions, memory budget) is reached.
	CodeLimit Code = 13
	// CodeNotStarted: the gateway ended a new session before its client
	// confirmed it (no frame arrived within the handshake timeout): no
	// upstream was dialed and no byte went either way, so the client may
	// open the session again (HELLO) and send what it holds from byte 0.
	CodeNotStarted Code = 14
)

var codeNames = [...]string{
	CodeNone: "NONE", CodeAccessDenied: "ACCESS_DENIED", CodeNotFound: "NOT_FOUND",
	CodeConflict: "CONFLICT", CodeThrottled: "THROTTLED", CodeValidation: "VALIDATION",
	CodeInternal: "INTERNAL", CodeBufferLost: "BUFFER_LOST", CodeVersion: "VERSION",
	CodeShuttingDown: "SHUTTING_DOWN", CodeTimeout: "TIMEOUT", CodeAppReset: "APP_RESET",
	CodeUpstream: "UPSTREAM", CodeLimit: "LIMIT", CodeNotStarted: "NOT_STARTED",
}

func (c Code) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("Code(%d)", uint16(c))
}

// Retryable reports whether a client that got c in REJECT may try the same
// resume again later (on a new link) rather than give the session up. Any
// other code, in particular one a gateway remembers a session ended with
// (TIMEOUT, LIMIT, APP_RESET, ...), is final.
func (c Code) Retryable() bool {
	switch c {
	case CodeThrottled, CodeInternal, CodeConflict:
		return true
	}
	return false
}
