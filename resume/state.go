package resume

import "fmt"

// State is where a session is in its life (docs/protocol.md §5.4; §9 maps
// them to GameLift Streams' and Diffusion's states).
type State int

const (
	// StateConnecting: the first link's handshake is under way.
	StateConnecting State = iota
	// StateActive: a link is attached and carries data.
	StateActive
	// StateDisconnected: no link (GameLift's PENDING_CLIENT_RECONNECTION
	// and DISCONNECTED). Data is still accepted into the replay buffer, up
	// to the disconnected limit, and no pings are sent. The session waits
	// for a resume until its reconnect timeout passes.
	StateDisconnected
	// StateReconnecting: a new link is being dialed or its resume
	// handshake is under way.
	StateReconnecting
	// StateClosed: the session is over; its buffers are freed.
	StateClosed
)

var stateNames = [...]string{"CONNECTING", "ACTIVE", "DISCONNECTED", "RECONNECTING", "CLOSED"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", int(s))
}
