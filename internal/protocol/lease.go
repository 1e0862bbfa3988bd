package protocol

import (
	"math/rand/v2"
	"strconv"
	"strings"
)

// A lease is named by its member of the leases index, which says all a
// reaper needs: "<token>:<owner>:<key>" for a drained key, "<token>:<owner>"
// for a batch of retries. Tokens and owners hold no colon; keys may, and
// come last. The lease's batch is under lease:<token>, its count under
// leasen:<token>.

// Lease is one lease, as its member of the leases index describes it.
type Lease struct {
	Token string
	Owner string // the consumer that took it
	Key   string // the drained key; "" for a batch of retries
}

// String returns the member of the leases index that names l.
func (l Lease) String() string {
	if l.Key == "" {
		return l.Token + ":" + l.Owner
	}
	return l.Token + ":" + l.Owner + ":" + l.Key
}

// ParseLease returns the lease a member of the leases index names.
func ParseLease(member string) Lease {
	tok, rest, _ := strings.Cut(member, ":")
	owner, key, _ := strings.Cut(rest, ":")
	return Lease{Token: tok, Owner: owner, Key: key}
}

// newToken returns a random 128-bit token, without colons.
func newToken() string {
	return strconv.FormatUint(rand.Uint64(), 36) + strconv.FormatUint(rand.Uint64(), 36)
}
