# triple_fault: prints a line, then loads an empty IDT and executes ud2. The #UD cannot be
# delivered, nor the #DF after it: the CPU shuts down (triple fault). minivmm must report it
# with the guest's registers and exit with a non-zero status.
	.code32
	.include "common.inc"

	program_start
	call uart_init
	mov $msg, %esi
	call puts
	lidt empty_idt
	ud2
	jmp poweroff

	.section .rodata
msg:	.asciz "about to triple fault\n"
	.balign 8
empty_idt:
	.word 0		# limit 0: no vector can be delivered
	.long 0
