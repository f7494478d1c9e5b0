package pkcs11

import (
	"errors"
	"fmt"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyd-dev/keyd/keystore"
)

// ckrName returns the name of a PKCS#11 return value for messages.
func ckrName(err error) string {
	var e p11.Error
	if errors.As(err, &e) {
		return e.Error()
	}
	return err.Error()
}

// code returns the CKR code in err, or 0 (CKR_OK) if there is none.
func code(err error) uint {
	var e p11.Error
	if errors.As(err, &e) {
		return uint(e)
	}
	return 0
}

// recoverable reports whether err means the session, the login, the
// handles or the device connection went away: the operation is retried once
// after the backend re-connects (new sessions, login, handles re-found).
//
// CKR_OBJECT_HANDLE_INVALID and CKR_KEY_HANDLE_INVALID are here because a
// handle dies with the login that found it (SoftHSM invalidates private
// object handles at logout and they stay invalid after a new login); the
// retry re-finds the key by CKA_ID and tells a stale handle from a lost key.
// CKR_GENERAL_ERROR is what SoftHSM returns when its token directory is gone.
func recoverable(err error) bool {
	switch code(err) {
	case p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED,
		p11.CKR_USER_NOT_LOGGED_IN,
		p11.CKR_DEVICE_REMOVED, p11.CKR_DEVICE_ERROR, p11.CKR_TOKEN_NOT_PRESENT,
		p11.CKR_SLOT_ID_INVALID, p11.CKR_CRYPTOKI_NOT_INITIALIZED,
		p11.CKR_OBJECT_HANDLE_INVALID, p11.CKR_KEY_HANDLE_INVALID,
		p11.CKR_GENERAL_ERROR:
		return true
	}
	return false
}

// deviceGone reports whether err says the connection to the token or the
// module itself is lost, so re-opening a session cannot help and the module
// must be finalized and initialized again. CKR_GENERAL_ERROR is not: SoftHSM
// returns it for a token whose directory was deleted, and re-initializing
// would only make the token disappear (ErrUnavailable) where the session
// still tells that the keys are gone (ErrKeyLost).
func deviceGone(err error) bool {
	switch code(err) {
	case p11.CKR_DEVICE_REMOVED, p11.CKR_DEVICE_ERROR, p11.CKR_TOKEN_NOT_PRESENT,
		p11.CKR_CRYPTOKI_NOT_INITIALIZED, p11.CKR_SLOT_ID_INVALID:
		return true
	}
	return false
}

// pinFailed reports whether err is a login failure that retrying would make
// worse: a real HSM locks the PIN after a few wrong ones.
func pinFailed(err error) bool {
	switch code(err) {
	case p11.CKR_PIN_INCORRECT, p11.CKR_PIN_INVALID, p11.CKR_PIN_LEN_RANGE,
		p11.CKR_PIN_EXPIRED, p11.CKR_PIN_LOCKED, p11.CKR_USER_PIN_NOT_INITIALIZED:
		return true
	}
	return false
}

// loginUnjudged reports whether err, from C_Login, says that the login
// could not be attempted (the session, the device or the module failed)
// rather than anything about the PIN. Every other failure counts as a
// refused PIN: a module may report a wrong PIN with a code of its own
// (CKR_FUNCTION_FAILED, CKR_GENERAL_ERROR…), and logging in again after
// each recovery would lock a real HSM's PIN.
func loginUnjudged(err error) bool {
	return deviceGone(err) || sessionDead(err) || passing(err)
}

// passing reports whether err says only that a call could not be done this
// time (memory, a cancelled function) or is not the module's answer at all,
// rather than anything about the request.
func passing(err error) bool {
	switch code(err) {
	case 0, p11.CKR_DEVICE_MEMORY, p11.CKR_HOST_MEMORY, p11.CKR_FUNCTION_CANCELED:
		return true
	}
	return false
}

// classify wraps a PKCS#11 error that is not recoverable with the keystore
// sentinel it means; other errors are returned as they are. The CKR code
// stays in the chain (errors.As(err, new(pkcs11.Error)) works) for logs.
func classify(err error) error {
	switch code(err) {
	case 0:
		return err
	case p11.CKR_MECHANISM_INVALID, p11.CKR_MECHANISM_PARAM_INVALID,
		p11.CKR_KEY_TYPE_INCONSISTENT, p11.CKR_KEY_SIZE_RANGE, p11.CKR_TEMPLATE_INCONSISTENT,
		p11.CKR_DOMAIN_PARAMS_INVALID, p11.CKR_CURVE_NOT_SUPPORTED:
		return fmt.Errorf("%w: %w", keystore.ErrUnsupportedAlgorithm, err)
	case p11.CKR_SESSION_COUNT, p11.CKR_DEVICE_MEMORY, p11.CKR_HOST_MEMORY,
		p11.CKR_FUNCTION_CANCELED, p11.CKR_TOKEN_WRITE_PROTECTED, p11.CKR_FUNCTION_FAILED:
		return fmt.Errorf("%w: %w", keystore.ErrUnavailable, err)
	}
	if pinFailed(err) {
		return fmt.Errorf("%w: %w", keystore.ErrLocked, err)
	}
	if recoverable(err) {
		return fmt.Errorf("%w: %w", keystore.ErrUnavailable, err)
	}
	return err
}

// deviceFailed reports whether err, which recovering would not help, still
// says that the token failed rather than the request, the key or the PIN:
// the Backend records it for Health, so that a token that fails every call
// is NOT_SERVING until a signature succeeds again.
func deviceFailed(err error) bool {
	switch code(err) {
	case p11.CKR_FUNCTION_FAILED, p11.CKR_DEVICE_MEMORY, p11.CKR_HOST_MEMORY, p11.CKR_SESSION_COUNT:
		return true
	}
	return false
}
