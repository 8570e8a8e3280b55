// Command lifeline is the client sidecar and gateway that keep the TCP
// sessions of unmodified applications alive through network drops.
package main

import (
	"crypto/tls"
	"os"
)

type tlsConfig = tls.Config

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }
