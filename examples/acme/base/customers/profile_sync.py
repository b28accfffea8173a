"""What a successful login records besides the Django user. v1 records nothing.

Called by customers.backends.CustomerEmailBackend after every successful login
(including the one that upgraded a legacy hash). Releases replace this module.
"""


def after_login(customer, user):
    return None
