package main

import (
	"regexp"
	"strings"
	"testing"
)

var namesLine = regexp.MustCompile(`^config f\.yaml: (file is empty|.*\bline [0-9]+\b)`)

// FuzzConfigFile feeds arbitrary bytes to the config loader and the
// validation after it (defaults filled in first, as parseOptions does):
// never a panic, and every decoding error names the file and the line.
func FuzzConfigFile(f *testing.F) {
	for _, s := range []string{
		readmeConfig,
		"gateway:\n  listen: 127.0.0.1:0\n  routes:\n    - {name: a, upstream: 127.0.0.1:1, connect_timeout: 0s}\n",
		"client:\n  listeners:\n    - {listen: 127.0.0.1:0, gateway: h:1, reconnect_strategy: fixed, reconnect_interval: 2s}\n",
		"gateway: [\n",
		"gateway:\n  listen: 127.0.0.1:0\n  colour: blue\n",
		"gateway:\n  buffer: lots\n  reconnect_timeout: -1s\n",
		"a: &x [*x]\n",
		"gateway: *nope\n",
		"<<: {gateway: 1}\n",
		"gateway: !!binary \"%%%\"\n",
		"log: {format: \x00}\n",
		"\xff\xfe",
		"",
		"---\n...\n---\n",
		"gateway:\n  routes:\n    - name: a\n    - name: a\n",
		"gateway:\n  listen: 127.0.0.1:0\n  listen: 127.0.0.1:1\n",
		"client: {listeners: [{listen: x, gateway: y, buffer: 99999999999999999999}]}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fc, err := parseConfig("f.yaml", b)
		if err != nil {
			if msg := err.Error(); !namesLine.MatchString(msg) || strings.Contains(msg, "\n") {
				t.Fatalf("error %q does not name the line on one line", msg)
			}
			return
		}
		fc = fc.withDefaults()
		if fc.Gateway != nil {
			if validateGateway(fc.Gateway) == nil {
				for _, r := range fc.Gateway.Routes {
					if _, err := fc.Gateway.sessionFile.over(r.sessionFile).sessionConfig(); err != nil {
						t.Fatalf("route %q passed validation, then: %v", r.Name, err)
					}
				}
			}
		}
		if fc.Client != nil {
			validateClient(fc.Client)
		}
	})
}

// readmeConfig is the config file example of the README.
const readmeConfig = `log: {format: json, level: info}
admin_addr: 127.0.0.1:9100     # beyond loopback, also admin_token_file: FILE
drain_timeout: 30s
gateway:
  listen: 0.0.0.0:7000         # or a list: [0.0.0.0:7000, 0.0.0.0:7001]
  transport: tls
  tls: {cert: /etc/lifeline/gw.pem, key: /etc/lifeline/gw.key, ca: /etc/lifeline/clients-ca.pem}
  max_sessions: 10000
  memory_budget: 4GiB
  reconnect_timeout: 120s      # session settings here are the gateway's defaults,
  buffer: 2MiB                 # each route may override any of them
  routes:
    - {name: redis, upstream: 127.0.0.1:6379}
    - {name: pg, upstream: 10.0.0.5:5432, connect_timeout: 2s, proxy_protocol: 2, reconnect_timeout: 0s}
client:
  listeners:
    - listen: 127.0.0.1:6380
      gateway: gw.example.net:7000
      route: redis
      transport: tls
      tls: {cert: /etc/lifeline/me.pem, key: /etc/lifeline/me.key, ca: /etc/lifeline/gw-ca.pem}
      reconnect_timeout: 300s
      reconnect_strategy: fixed
      reconnect_interval: 2s
`
