package main

import (
	"fmt"
	"io"
	"log/slog"
)

// parseLevel parses --log-level.
func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("--log-level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

// newLogger logs to w in format (text or json) at level; both are
// checked before (parseOptions).
func newLogger(w io.Writer, format, level string) *slog.Logger {
	lv, _ := parseLevel(level)
	return newLoggerVar(w, format, lv)
}

// newLoggerVar is newLogger at a level that can change while it runs (a
// config reload sets log.level).
func newLoggerVar(w io.Writer, format string, lv slog.Leveler) *slog.Logger {
	opts := &slog.HandlerOptions{Level: lv}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
