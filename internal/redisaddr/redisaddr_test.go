package redisaddr

import (
	"crypto/tls"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in        string
		addrs     []string
		master    string // the Sentinel master name; empty: none
		user, pw  string
		db        int
		tls       bool
		display   string // empty: in, trimmed
		sentinels bool   // TLS to the Sentinels too
	}{
		{in: "127.0.0.1:6379", addrs: []string{"127.0.0.1:6379"}},
		{in: " redis.internal:7000 ", addrs: []string{"redis.internal:7000"}},
		{in: "[::1]:6379", addrs: []string{"[::1]:6379"}},
		{in: ":6379", addrs: []string{":6379"}},
		{in: "redis://127.0.0.1:6380", addrs: []string{"127.0.0.1:6380"}},
		{in: "redis://h", addrs: []string{"h:6379"}},
		{in: "REDIS://h:1", addrs: []string{"h:1"}},
		{in: "redis://app:s3cret@h:6380/2", addrs: []string{"h:6380"}, user: "app", pw: "s3cret", db: 2, display: "redis://app:xxxxx@h:6380/2"},
		{in: "redis://:s3cret@h:6380", addrs: []string{"h:6380"}, pw: "s3cret", display: "redis://:xxxxx@h:6380"},
		{in: "redis://a:1?addr=b:2&addr=c:3", addrs: []string{"a:1", "b:2", "c:3"}},
		{in: "rediss://h:6380", addrs: []string{"h:6380"}, tls: true},
		{in: "redis://:pw@s1:26379?addr=s2:26379&master_set=mymaster", addrs: []string{"s1:26379", "s2:26379"}, master: "mymaster", pw: "pw",
			display: "redis://:xxxxx@s1:26379?addr=s2:26379&master_set=mymaster"},
		{in: "rediss://s1:26379?master_set=m", addrs: []string{"s1:26379"}, master: "m", tls: true, sentinels: true},
		{in: "sentinel://mymaster@127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381", master: "mymaster",
			addrs: []string{"127.0.0.1:26379", "127.0.0.1:26380", "127.0.0.1:26381"}},
		{in: "SENTINEL://m@h:1", addrs: []string{"h:1"}, master: "m"},
		{in: "sentinel://m@h:1, [::1]:2 ,", addrs: []string{"h:1", "[::1]:2"}, master: "m"},
		{in: "sentinel://my-master.1@h:26379", addrs: []string{"h:26379"}, master: "my-master.1"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			a, err := Parse(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			o := a.Option
			if !slices.Equal(o.InitAddress, tc.addrs) {
				t.Errorf("InitAddress %q, want %q", o.InitAddress, tc.addrs)
			}
			if !o.DisableCache {
				t.Error("DisableCache not set")
			}
			if o.Sentinel.MasterSet != tc.master || a.Sentinel() != (tc.master != "") {
				t.Errorf("MasterSet %q (Sentinel %v), want %q", o.Sentinel.MasterSet, a.Sentinel(), tc.master)
			}
			var refresh time.Duration
			if tc.master != "" {
				refresh = SentinelRefresh
			}
			if o.Sentinel.TopologyRefreshInterval != refresh {
				t.Errorf("TopologyRefreshInterval %v, want %v", o.Sentinel.TopologyRefreshInterval, refresh)
			}
			if o.Username != tc.user || o.Password != tc.pw || o.Sentinel.Username != "" || o.Sentinel.Password != "" {
				t.Errorf("credentials %q:%q (Sentinels %q:%q), want %q:%q for the servers only",
					o.Username, o.Password, o.Sentinel.Username, o.Sentinel.Password, tc.user, tc.pw)
			}
			if o.SelectDB != tc.db {
				t.Errorf("SelectDB %d, want %d", o.SelectDB, tc.db)
			}
			if (o.TLSConfig != nil) != tc.tls || (o.Sentinel.TLSConfig != nil) != tc.sentinels {
				t.Errorf("TLS %v, to the Sentinels %v; want %v, %v", o.TLSConfig != nil, o.Sentinel.TLSConfig != nil, tc.tls, tc.sentinels)
			}
			if tc.sentinels && (o.TLSConfig.ServerName != "" || o.Sentinel.TLSConfig.ServerName != "") {
				t.Errorf("ServerName %q and %q, want none: each host is checked against its own address",
					o.TLSConfig.ServerName, o.Sentinel.TLSConfig.ServerName)
			}
			want := tc.display
			if want == "" {
				want = strings.TrimSpace(tc.in)
			}
			if a.Display != want || a.String() != want {
				t.Errorf("Display %q, want %q", a.Display, want)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // in the error
	}{
		{"", "empty; want HOST:PORT"},
		{"localhost", `invalid Redis address "localhost": missing port in address; want HOST:PORT, redis://`},
		{"localhost:0", `bad port "0"`},
		{"localhost:65536", `bad port "65536"`},
		{"localhost:redis", `bad port "redis"`},
		{"a:1,b:2", "several addresses are a Sentinel setup's, as sentinel://MASTER@HOST:PORT,HOST:PORT"},
		{"app:s3cret@h:1", `invalid Redis address "app:xxxxx@h:1": a value with a user name or password is a URL`},
		{"sentinel://h:1,h:2", "no master name; want sentinel://MASTER@HOST:PORT[,HOST:PORT...]"},
		{"sentinel://@h:1", "no master name before @"},
		{"sentinel://m@", "no Sentinel address after @"},
		{"sentinel://m@ , ", "no Sentinel address after @"},
		{"sentinel://m@h", `Sentinel address "h": missing port in address`},
		{"sentinel://m@h:1,h:99999", `Sentinel address "h:99999": bad port "99999"`},
		{"sentinel://m@h:1/0", `Sentinel address "h:1/0": bad port "1/0"`},
		{"sentinel://app:s3cret@h:1", `"sentinel://app:xxxxx@h:1": the master name holds a colon (credentials do not go in a sentinel:// address)`},
		{"sentinel://my master@h:1", `invalid master name "my master"`},
		{"ftp://h:1", `unknown scheme "ftp"`},
		{"unix:///tmp/redis.sock", `unknown scheme "unix"`},
		{"redis://", "no HOST:PORT"},
		{"redis://h:0", `address "h:0": bad port "0"`},
		{"redis://h:1?addr=g:70000", `address "g:70000": bad port "70000"`},
		{"redis://h:x", "not a valid URL: invalid port"},
		{"redis://h:1/x", `invalid database number: "x"`},
		{"redis://h:1/0/1", "invalid URL path"},
		// A password holding an unescaped slash: the URL parser reads part
		// of it as a port, or as a path, and nothing of it may show.
		{"redis://app:s3/cret@h:1", `"redis://app:xxxxx@h:1": not a valid URL (details left out`},
		{"redis://app:12/cret@h:1", `"redis://app:xxxxx@h:1": not a valid URL (details left out`},
		{"redis://app:s3cret@h:0", `"redis://app:xxxxx@h:0": not a valid URL (details left out`},
	} {
		t.Run(tc.in, func(t *testing.T) {
			_, err := Parse(tc.in)
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to hold %q", err, tc.want)
			}
			for _, secret := range []string{"s3cret", "s3/", "cret", "12/"} {
				if strings.Contains(tc.in, secret) && strings.Contains(err.Error(), secret) {
					t.Errorf("error %q holds the password's %q", err, secret)
				}
			}
		})
	}
}

func TestRedact(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:6379":                   "127.0.0.1:6379",
		"redis://h:1":                      "redis://h:1",
		"redis://app@h:1":                  "redis://app@h:1",
		"redis://app:pw@h:1/0":             "redis://app:xxxxx@h:1/0",
		"redis://:pw@h:1":                  "redis://:xxxxx@h:1",
		"redis://app:p@ss:w/rd@h:1?addr=g": "redis://app:xxxxx@h:1?addr=g",
		"app:pw@h:1":                       "app:xxxxx@h:1",
		"sentinel://m@h:1,g:2":             "sentinel://m@h:1,g:2",
		"sentinel://u:pw@h:1":              "sentinel://u:xxxxx@h:1",
		"":                                 "",
	} {
		if got := Redact(in); got != want {
			t.Errorf("Redact(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSetTLS(t *testing.T) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: "redis.example"}

	single, err := Parse("redis.example:6380")
	if err != nil {
		t.Fatal(err)
	}
	single.SetTLS(tc)
	if single.Option.TLSConfig != tc || single.Option.Sentinel.TLSConfig != nil {
		t.Errorf("one server: TLS %p, to Sentinels %p; want %p and none", single.Option.TLSConfig, single.Option.Sentinel.TLSConfig, tc)
	}

	s, err := Parse("sentinel://m@s1:26379,s2:26379")
	if err != nil {
		t.Fatal(err)
	}
	s.SetTLS(tc)
	o := s.Option
	if o.TLSConfig == nil || o.Sentinel.TLSConfig == nil || o.TLSConfig == o.Sentinel.TLSConfig {
		t.Fatalf("Sentinel setup: TLS %p, to Sentinels %p; want two configurations", o.TLSConfig, o.Sentinel.TLSConfig)
	}
	if o.TLSConfig.ServerName != "" || o.Sentinel.TLSConfig.ServerName != "" || o.Sentinel.TLSConfig.MinVersion != tls.VersionTLS12 {
		t.Errorf("Sentinel setup: ServerName %q and %q, MinVersion %x", o.TLSConfig.ServerName, o.Sentinel.TLSConfig.ServerName, o.Sentinel.TLSConfig.MinVersion)
	}
	if tc.ServerName != "redis.example" {
		t.Errorf("SetTLS changed the caller's configuration: ServerName %q", tc.ServerName)
	}
	s.SetTLS(nil)
	if s.Option.TLSConfig != nil || s.Option.Sentinel.TLSConfig != nil {
		t.Error("SetTLS(nil) left TLS on")
	}
}

// Parse never panics, and no password it could read shows in what it
// returns: neither in Display nor in an error.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"127.0.0.1:6379", "redis://u:p@h:1/0?addr=g:2", "rediss://h:1?master_set=m",
		"sentinel://m@h:1,g:2", "sentinel://u:p@h:1", "redis://u:p/q@h:1", "u:p@h:1", "redis://h:1?dial_timeout=x"} {
		f.Add(s, "s3cr3t")
	}
	f.Fuzz(func(t *testing.T, s, pw string) {
		if len(pw) < 4 || strings.ContainsAny(pw, "@") || strings.Contains(s, pw) || strings.Contains("xxxxx", pw) {
			return // too short to be told apart from the rest
		}
		if strings.HasPrefix(pw, "//") {
			return // USER:PW@ would read as SCHEME://...: no way to tell
		}
		if strings.ContainsFunc(s+pw, func(r rune) bool { return r < ' ' || r > '~' || r == '"' || r == '\\' }) {
			return // errors quote the value: escapes would make false matches
		}
		i := strings.Index(s, "@")
		if i < 0 {
			return
		}
		// Put the password into the user information: USER:PW@...
		user := s[:i]
		if j := strings.Index(user, "://"); j >= 0 {
			user = user[j+3:]
		}
		if strings.Contains(user, ":") || strings.Contains(s[:i]+":xxxxx"+s[i:], pw) {
			return // a password that the redacted form itself spells
		}
		in := s[:i] + ":" + pw + s[i:]
		a, err := Parse(in)
		if err != nil {
			if strings.Contains(err.Error(), pw) {
				t.Fatalf("Parse(%q): error %q holds the password", in, err)
			}
			return
		}
		if strings.Contains(a.Display, pw) {
			t.Fatalf("Parse(%q): Display %q holds the password", in, a.Display)
		}
	})
}
